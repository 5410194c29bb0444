"""Host side: structured channel pruning of Ultralytics YOLOv8 detectors and fine-tuning."""
