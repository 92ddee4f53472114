// PNG decoding for the masks and confidence maps of /v1 answers: 8-bit single-channel PNGs
// (greyscale or indexed, never interlaced: the kinds segserve writes), inflated with the
// browser's own DecompressionStream.

export function base64Bytes(text) {
  const binary = atob(text);
  const bytes = new Uint8Array(binary.length);
  for (let i = 0; i < binary.length; i++) bytes[i] = binary.charCodeAt(i);
  return bytes;
}

async function inflate(bytes) {
  const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("deflate"));
  return new Uint8Array(await new Response(stream).arrayBuffer());
}

function paeth(a, b, c) {
  const p = a + b - c;
  const [pa, pb, pc] = [Math.abs(p - a), Math.abs(p - b), Math.abs(p - c)];
  return pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
}

/** Decodes an 8-bit single-channel PNG (greyscale or indexed, the kinds segserve writes) to
 * {width, height, pixels: Uint8Array}: the class ids of a mask, or the values of a confidence map. */
export async function decodePng(bytes) {
  const signature = [137, 80, 78, 71, 13, 10, 26, 10];
  if (bytes.length < 8 || signature.some((value, i) => bytes[i] !== value)) {
    throw new Error("the mask is not a PNG");
  }
  const view = new DataView(bytes.buffer, bytes.byteOffset, bytes.byteLength);
  let header = null;
  const idat = [];
  for (let offset = 8; offset + 8 <= bytes.length; ) {
    const length = view.getUint32(offset);
    const kind = String.fromCharCode(...bytes.subarray(offset + 4, offset + 8));
    const start = offset + 8;
    if (start + length > bytes.length) throw new Error(`PNG chunk ${kind} is truncated`);
    if (kind === "IHDR") {
      header = {
        width: view.getUint32(start),
        height: view.getUint32(start + 4),
        depth: bytes[start + 8],
        colourType: bytes[start + 9],
        interlace: bytes[start + 12],
      };
    } else if (kind === "IDAT") {
      idat.push(bytes.subarray(start, start + length));
    } else if (kind === "IEND") {
      break;
    }
    offset = start + length + 4;
  }
  if (!header) throw new Error("PNG without IHDR");
  const { width, height, depth, colourType, interlace } = header;
  if (depth !== 8 || (colourType !== 0 && colourType !== 3) || interlace !== 0) {
    throw new Error(`PNG kind not supported (depth ${depth}, colour type ${colourType})`);
  }
  const raw = await inflate(new Uint8Array(await new Blob(idat).arrayBuffer()));
  if (raw.length < height * (width + 1)) throw new Error("PNG data is truncated");
  const pixels = new Uint8Array(width * height);
  for (let y = 0; y < height; y++) {
    const filter = raw[y * (width + 1)];
    const row = raw.subarray(y * (width + 1) + 1, (y + 1) * (width + 1));
    const out = y * width;
    for (let x = 0; x < width; x++) {
      const a = x ? pixels[out + x - 1] : 0;
      const b = y ? pixels[out - width + x] : 0;
      const c = x && y ? pixels[out - width + x - 1] : 0;
      const predictor = [0, a, b, (a + b) >> 1, paeth(a, b, c)][filter];
      if (predictor === undefined) throw new Error(`PNG filter ${filter} is not valid`);
      pixels[out + x] = (row[x] + predictor) & 255;
    }
  }
  return { width, height, pixels };
}

