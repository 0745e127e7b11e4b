"""The ingress: HTTP and WebSocket routes, request reading, response shaping, the web page.
Torch-free: it decodes audio and calls the variant deployments through their handles."""
