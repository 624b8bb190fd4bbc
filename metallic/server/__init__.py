"""`metallic serve`: an OpenAI-compatible HTTP server over the batching engine.

protocol.py reads OpenAI requests and writes its responses, async_engine.py runs the engine in a
background thread for coroutines, metrics.py keeps the Prometheus figures, app.py holds the
routes, launch.py binds the socket and runs uvicorn with a graceful shutdown.
"""
