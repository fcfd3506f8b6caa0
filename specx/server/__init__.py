"""`specx serve`: an OpenAI-compatible HTTP server for a bundle (the optional ``serve`` extra: Starlette, uvicorn).

``protocol`` checks requests and builds answers (plain data), ``engine`` runs them one at a time on the Generator,
``app`` is the Starlette app and the uvicorn runner. Like the runtime, nothing here imports torch.
"""
