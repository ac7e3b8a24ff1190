"""`yolokd export`: export a distilled student for deployment, refusing unsafe checkpoints and checking the result.

- `safety`: load a user's checkpoint once, without running code it carries, and refuse anything that is not a plain
  Ultralytics detection student (`load_student`).
- `parity`: compare the exported model with the PyTorch checkpoint on the same images (`export_parity`: an ONNX file
  through the torch-free edge runtime `yolokd_edge`, the code that ships; a TensorRT engine through AutoBackend).
- `command`: `export_student` (load, export with Ultralytics' exporter, check) and the `yolokd export` command.

Nothing is imported here, so `yolokd export help` loads neither torch nor Ultralytics.
"""
