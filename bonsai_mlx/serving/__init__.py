"""The OpenAI-compatible server's parts: settings (config), request parsing (request), image ingest (images,
fetch), the one engine thread that runs the model (engine) and the HTTP layer (httpd). `bonsai_mlx.server` is the
command; its docstring says how the parts fit and why they are built on the standard library."""
