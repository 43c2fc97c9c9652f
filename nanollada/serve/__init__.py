"""``nanollada serve``: an OpenAI-compatible HTTP API and a web page over checkpoints of any paradigm.

    nanollada serve --ckpt logs/tiny_ar_sft/checkpoints/last.ckpt --ckpt logs/tiny_diffusion_sft/checkpoints/last.ckpt

- ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (``stream: true`` as server-sent events
  ending in ``data: [DONE]``); nanollada's decoding fields under ``"nanollada": {...}`` (``protocol``);
- ``GET /``: the chat page (``static/``), two models side by side, the diffusion canvas animated;
- a queue per model: requests to one model are answered one at a time in arrival order, different models side by
  side (``app``, ``engine``); FastAPI + uvicorn, installed with ``pip install -e ".[serve]"``.

:func:`start_server` runs the app in a background thread (tests, ``benchmarks/serve_load.py``).
"""

from __future__ import annotations

import socket
import threading
import time


def require_serve_extra() -> None:
    """A clear message when FastAPI / uvicorn are missing."""
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise SystemExit(f"nanollada serve needs FastAPI and uvicorn ({e.name} is missing): "
                         'pip install -e ".[serve]"') from None


def build_app(paths: list[str], settings, device: str = "cpu"):
    """Load every checkpoint and return the FastAPI app serving them. ``paths`` entries may be ``NAME=PATH``."""
    from nanollada.loading import load_checkpoint
    from nanollada.serve.app import create_app
    from nanollada.serve.engine import ServedModel, model_id_for
    served, seen = [], set()
    for spec in paths:
        name, eq, path = spec.partition("=")
        if not eq or "/" in name or name.endswith(".ckpt"):
            name, path = model_id_for(spec), spec
        base, k = name, 2
        while name in seen:
            name, k = f"{base}-{k}", k + 1
        seen.add(name)
        served.append(ServedModel(name, load_checkpoint(path, device), settings))
    return create_app(served)


class ServerThread:
    """A uvicorn server on ``host``:``port`` (0 = a free port) in a daemon thread; ``stop()`` ends it.

    Args:
        app: The ASGI app.
        host: Address to bind (127.0.0.1 for tests).
        port: TCP port; 0 picks a free one (``self.port`` tells which).
    """

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.host, self.port = host, self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on", timeout_keep_alive=5))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 30) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the server did not start")
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


def start_server(app, host: str = "127.0.0.1", port: int = 0) -> ServerThread:
    """Run ``app`` in a background thread; returns the started :class:`ServerThread`."""
    return ServerThread(app, host, port).start()
