"""Process-level helpers shared by extraction and training: device and distributed context, CPU set-up,
safe state-dict reading, the dataclass + YAML config loader. A leaf: imports neither extract/, model/ nor tasks/."""
