"""A lean stand-in for the Spine, for the latency benchmark only (``bench_rate.py --only latency``).

It does the least a Spine's transport does and nothing else, so the pace it sees is the kit's: each
POST to /clinical is answered 202 after the latency asked for, with a poll location and a
Retry-After of 100 ms; each poll is answered 200 with a bare MCCI AA acknowledgement of that
message. No checks, no store, no identity provider (log in against ``scr-nb spine-sim``). It keeps
the times of the POSTs it accepted in the shape of the simulator's ``/_admin/traffic``.

    python benchmarks/lean_spine.py --port 8990 --latency-ms 100
"""

from __future__ import annotations

import argparse
import asyncio
import time

from aiohttp import web

ACK = ('<MCCI_IN010000UK13 xmlns="urn:hl7-org:v3"><acknowledgement typeCode="AA">'
       '<messageRef><id root="{}"/></messageRef></acknowledgement></MCCI_IN010000UK13>')
MESSAGE_ID = (b"<eb:MessageId>", b"</eb:MessageId>")


def make_app(latency_s: float) -> web.Application:
    started = time.monotonic()
    accepted: list[float] = []
    polls = [0]

    async def clinical(request: web.Request) -> web.Response:
        body = await request.read()
        await asyncio.sleep(latency_s)
        start = body.find(MESSAGE_ID[0]) + len(MESSAGE_ID[0])
        message_id = body[start:body.find(MESSAGE_ID[1], start)].decode()
        accepted.append(time.monotonic() - started)
        return web.Response(status=202, headers={"Content-Location": f"/poll/{message_id}",
                                                 "Retry-After": "100"})

    async def poll(request: web.Request) -> web.Response:
        polls[0] += 1
        return web.Response(status=200, content_type="text/xml",
                            text=ACK.format(request.match_info["message_id"]))

    async def base(request: web.Request) -> web.Response:
        return web.Response(text="lean Spine")

    async def traffic(request: web.Request) -> web.Response:
        return web.json_response({"accepted_posts": {
            "count": len(accepted), "first_s": accepted[0] if accepted else None,
            "last_s": accepted[-1] if accepted else None}, "per_second": []})

    async def stats(request: web.Request) -> web.Response:
        return web.json_response({"requests": len(accepted), "polls": polls[0],
                                  "transient_faults_injected": {}})

    app = web.Application(client_max_size=1 << 24)
    app.add_routes([web.post("/clinical", clinical), web.get("/poll/{message_id}", poll),
                    web.get("/", base), web.get("/_admin/traffic", traffic),
                    web.get("/_admin/stats", stats)])
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency-ms", type=float, default=100.0)
    args = parser.parse_args()
    web.run_app(make_app(args.latency_ms / 1000.0), host="127.0.0.1", port=args.port,
                print=None, access_log=None)


if __name__ == "__main__":
    main()
