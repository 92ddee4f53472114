"""Training, evaluation and ONNX export of the bundled CamVid segmentation models.

Needs ``torch`` (CPU build is enough), which the serving runtime does not:
the service only loads the exported ONNX files.
"""
