"""``lxmert-serve``: a fine-tuned model answering questions about uploaded images, as a local web page and an HTTP
API (FastAPI + uvicorn): :mod:`.uploads` (checked uploads), :mod:`.worker` (the one device thread, micro
batches), :mod:`.app` (the routes), :mod:`.cli` (the command)."""
