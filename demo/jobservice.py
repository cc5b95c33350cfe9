"""A demo job API shaped like the seed service's, for `make demo` and the benchmark.

GET  /api/jobs/{id}/status  -> {"id", "status", "progress", "message", "resultLink"?}
POST /api/jobs              -> 201 {"id", "statusUrl"}   (starts a new job)

A job is QUEUED, then PROCESSING, then COMPLETED (with `resultLink`), or FAILED
when its id contains "fail". A job that is asked about before it was created
starts at that moment, so a JobWatch can name any id.
"""

from __future__ import annotations

import argparse
import itertools
import time

from aiohttp import web

_ids = itertools.count(1000)


class Jobs:
    def __init__(self, queued: float, processing: float) -> None:
        self.queued, self.processing = queued, processing
        self.started: dict[str, float] = {}

    def status(self, job_id: str) -> dict[str, object]:
        started = self.started.setdefault(job_id, time.monotonic())
        elapsed = time.monotonic() - started
        if elapsed < self.queued:
            return {
                "id": job_id,
                "status": "QUEUED",
                "progress": 0,
                "message": "waiting for a worker",
            }
        if elapsed < self.queued + self.processing:
            progress = int(100 * (elapsed - self.queued) / self.processing)
            return {
                "id": job_id,
                "status": "PROCESSING",
                "progress": progress,
                "message": f"{progress}% done",
            }
        if "fail" in job_id:
            return {
                "id": job_id,
                "status": "FAILED",
                "progress": 100,
                "message": "the report generator ran out of memory",
            }
        return {
            "id": job_id,
            "status": "COMPLETED",
            "progress": 100,
            "message": "report ready",
            "resultLink": f"https://reports.example.com/results/{job_id}.pdf",
        }


def make_app(jobs: Jobs) -> web.Application:
    async def status(request: web.Request) -> web.Response:
        return web.json_response(jobs.status(request.match_info["job_id"]))

    async def create(request: web.Request) -> web.Response:
        job_id = str(next(_ids))
        jobs.status(job_id)
        return web.json_response(
            {"id": job_id, "statusUrl": f"/api/jobs/{job_id}/status"}, status=201
        )

    app = web.Application()
    app.router.add_get("/api/jobs/{job_id}/status", status)
    app.router.add_post("/api/jobs", create)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8089)
    parser.add_argument("--queued", type=float, default=3.0, help="seconds a job stays QUEUED")
    parser.add_argument(
        "--processing", type=float, default=8.0, help="seconds a job stays PROCESSING"
    )
    args = parser.parse_args()
    web.run_app(
        make_app(Jobs(args.queued, args.processing)),
        host=args.host,
        port=args.port,
        print=lambda *_: print(f"demo job API on http://{args.host}:{args.port}", flush=True),
        access_log=None,
    )


if __name__ == "__main__":
    main()
