"""`metallic serve`: an OpenAI-compatible HTTP server over the batching engine.

protocol.py reads OpenAI requests and writes its responses, engine_process.py runs the engine in
a process of its own, async_engine.py is the front end's handle on it for coroutines, metrics.py
keeps the Prometheus figures, app.py holds the routes, launch.py binds the socket and runs
uvicorn with a graceful shutdown.
"""
