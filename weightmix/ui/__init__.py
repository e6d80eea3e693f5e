"""The local web UI (`weightmix ui`): a FastAPI app over weightmix's API and a plain page.

FastAPI rather than Gradio: a small, stable dependency (no front-end framework whose updates
break extensions, the very trouble users of host UIs have), a page whose elements keep their
ids for a real-browser test, and the server in full control of every path it touches."""
