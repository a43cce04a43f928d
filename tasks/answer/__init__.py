"""``lxmert-answer``: ask a fine-tuned model about an image (the detector in memory, the model, the drawing)."""
