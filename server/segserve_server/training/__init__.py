"""Training, ONNX export and evaluation of segmentation models (`segserve train/export/eval`).

    train           `segserve train`: trains a CamVid model from scratch (torch)
    recipe          the recipe flags, the resume check, and picking a stage's best run
    losses          cross-entropy with OHEM, Lovász-softmax and dice terms (torch)
    data            CamVid loading, augmentation and class weights (numpy, OpenCV)
    sampling        crops centred on rare classes (numpy)
    photometric     hue, blur and noise augmentation (numpy, OpenCV)
    models          the bundled architectures: DeepLabV3+ and U-Net (torch)
    scores          confusion matrix, IoU / mIoU: one definition for train and eval (numpy)
    onnx_export     a torch model as ONNX with the argmax inside; torch-vs-onnxruntime check
    export          `segserve export`: the export pipeline and its command line (torch)
    export_sources  the model to export: a training checkpoint or a user's factory (torch)
    export_config   ModelSpec, BatchingOptions, ExportError and the config.pbtxt text
    export_checks   the checks before anything is installed, agreement with torch included
    evaluate        `segserve eval`: through a server or offline, and its command line
    eval_data       the labelled data set of `segserve eval`: folders, pairs, label maps
    repository      a repository model found and checked for the offline tools
    quantize        `segserve quantize`: static INT8 (QDQ) version of a repository model (onnx)
    flip            `segserve flip-average`: a version's test-time flip-averaging variant (onnx)
    engine          `segserve build-engine`: a TensorRT engine version (tensorrt, GPU)

Only train and export need ``torch`` (the CPU build is enough; `pip install 'segserve[train]'`);
`segserve eval` and the server never import it: the service only loads the exported ONNX files.
"""

__all__: list[str] = []
