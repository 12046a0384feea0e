"""The project's own small pretrained models: the demo's base SD and its two face critics."""
