"""Data code the tasks share (no engine): region features from the stores, text, answer tables, JSON reading, the
model-folder format."""
