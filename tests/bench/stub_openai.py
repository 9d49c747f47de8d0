"""A stub OpenAI-compatible server for the load-generator tests: streams `max_tokens` chunks of
" t<i>", one every `chunk_delay_s`, then the usage and [DONE]; records every request body."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


def stub_app(model_id: str = "stub-model", chunk_delay_s: float = 0.002) -> FastAPI:
    app = FastAPI()
    seen: list[dict] = []
    app.state.seen = seen

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        seen.append(body)
        if body.get("model") != model_id:
            return JSONResponse({"error": {"message": "unknown model"}}, status_code=404)
        n = int(body["max_tokens"])
        prompt = body["prompt"]
        num_prompt = len(prompt) if isinstance(prompt, list) else len(prompt.split())

        async def stream():
            for i in range(n):
                await asyncio.sleep(chunk_delay_s)
                chunk = {"id": "c", "object": "text_completion", "choices": [{"index": 0, "text": f" t{i}"}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            usage = {"prompt_tokens": num_prompt, "completion_tokens": n, "total_tokens": num_prompt + n}
            yield f"data: {json.dumps({'id': 'c', 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return app


class StubServer:
    """`app` served by uvicorn on 127.0.0.1:`port` in a daemon thread, started on construction."""

    def __init__(self, app: FastAPI, port: int) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"stub server did not start on port {port}")
            time.sleep(0.02)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        assert not self.thread.is_alive()
