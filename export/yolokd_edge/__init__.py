"""yolokd-edge: run a YOLO detector exported to ONNX (e.g. a yolokd-distilled student) with numpy, OpenCV and
ONNX Runtime only: no torch, no Ultralytics, so it fits on an edge device.

    from yolokd_edge import EdgeDetector
    det = EdgeDetector("best.onnx", device="auto", conf=0.25)
    boxes = det(cv2.imread("image.jpg"))[0]  # (N, 6): x1, y1, x2, y2, score, class (original-image pixels)
"""

from yolokd_edge.runtime import EdgeDetector, draw, letterbox, nms, select_providers, tensorrt_options

__version__ = "0.1.0"
__all__ = ["EdgeDetector", "draw", "letterbox", "nms", "select_providers", "tensorrt_options", "__version__"]
