"""The Videos API under load while its stage processes are killed: does every video still finish?

    python bench/soak.py [--videos 200] [--concurrency 8] [--steps 5] [--kill-every 20] [--max-kills 8]
                         [--drain-timeout 300] [--port 0] [--out soak.json]

The server is `framecast serve --model tiny` (or `--model`; of the checkout this file is in) in a session of
its own (its own Ray), on 127.0.0.1 and a free port unless --port says one; its output goes to
server.log in the data directory, which is kept, with the job database. This process is the
load: `concurrency` threads of the official `openai` client (no retries of its own), each
submitting a video (`client.videos.create`, a few steps through `extra_body`), polling it every
100 ms (`client.videos.retrieve`) until it is completed or failed, then submitting the next. A
429 is counted and retried after its Retry-After; a 5xx, a connection error and a timeout are
counted and retried after a short sleep (a retried create may make a video twice: the server's
own count, from `client.videos.list`, says so). Meanwhile a chaos thread SIGKILLs a random
stage process every `kill-every` seconds, at most `max-kills` times: a replica of the Encoder,
DenoiserGroup or Decoder deployment, or a denoiser rank (a `StageActor`), found by its process
title in `ps`, only among the server's own session, and only once it is up (not while Serve is
still starting it). After the last submission the clients wait at most `drain-timeout` seconds
for their videos; a video that is neither completed nor failed by then is lost (as is every
video still out if the server process exits on its own, which ends the run).

Latency is first create attempt -> completed as a client sees it (429 waits included);
throughput is completed videos over the wall time from the first submission to the last
completion; a kill's recovery is the time from the kill to the next video a client sees
completed; "re-run by server" counts videos whose `attempts` went past 1 (the server gave the
job back to its queue). The server is then stopped with SIGINT (SIGKILL to its session after
30 s) and no process of its session may be left. Prints a markdown report, and writes it as JSON
with --out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import openai

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "a red fox running through fresh snow"
HOST = "127.0.0.1"
RETRY_SLEEP_S = 0.5  # after a 5xx or a connection error
REQUEST_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
# The stage processes, by the title Ray gives them: a Serve replica is `ray::ServeReplica:<app>:<deployment>`
# (with `.<method>` while it runs one; `ray::SERVE_REPLICA::<app>#<deployment>#<id>:...__init__` while it is
# built), a denoiser rank (cluster/actors.py, owned by a DenoiserGroup replica) `ray::StageActor`.
STAGE_TITLE = re.compile(r"^ray::(?:\S*ServeReplica:framecast:(Encoder|DenoiserGroup|Decoder)|(StageActor))\b")
STARTING = ("SERVE_REPLICA::", "initialize_and_get_metadata", "__init__", "StageActor.start")
TERMINAL = ("completed", "failed")


@dataclass
class Video:
    n: int
    id: str | None = None
    status: str = "unsubmitted"
    first_try: float | None = None  # time.monotonic() of the first create attempt
    created: float | None = None
    finished: float | None = None  # when a client saw it completed or failed
    error_code: str | None = None
    attempts: int | None = None  # the server's tries at it, as last seen

    def as_dict(self) -> dict[str, Any]:
        took = round(self.finished - self.first_try, 2) if self.finished else None
        return {"n": self.n, "id": self.id, "status": self.status, "error_code": self.error_code,
                "attempts": self.attempts, "latency_s": took}  # fmt: skip


@dataclass
class Kill:
    at: float  # time.monotonic()
    deployment: str
    pid: int
    title: str
    recovery_s: float | None = None


@dataclass
class Tally:
    rate_limited: int = 0  # 429
    server_errors: Counter = field(default_factory=Counter)  # 5xx by status
    connection_errors: int = 0
    timeouts: int = 0
    other_errors: Counter = field(default_factory=Counter)  # any other 4xx, by status
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count(self, error: openai.OpenAIError) -> None:
        with self.lock:
            if isinstance(error, openai.APITimeoutError):
                self.timeouts += 1
            elif isinstance(error, openai.APIConnectionError):
                self.connection_errors += 1
            elif isinstance(error, openai.RateLimitError):
                self.rate_limited += 1
            elif isinstance(error, openai.APIStatusError) and error.status_code >= 500:
                self.server_errors[error.status_code] += 1
            elif isinstance(error, openai.APIStatusError):
                self.other_errors[error.status_code] += 1

    def as_dict(self) -> dict[str, Any]:
        with self.lock:
            return {"rate_limited": self.rate_limited, "server_errors": dict(self.server_errors),
                    "connection_errors": self.connection_errors, "timeouts": self.timeouts,
                    "other_errors": dict(self.other_errors)}  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def launch(command: list[str], data: Path) -> subprocess.Popen:
    """`framecast serve` in a session of its own (its pid is the session's id), output to server.log."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with open(data / "server.log", "a") as log:  # the framecast this file belongs to, wherever cwd is
        return subprocess.Popen(command, stdout=log, stderr=subprocess.PIPE, text=True, cwd=data, env=env,
                                start_new_session=True)  # fmt: skip


def wait_serving(server: subprocess.Popen, data: Path) -> None:
    """Until the server says it is serving; then its stderr goes on into server.log."""
    log = open(data / "server.log", "a")  # noqa: SIM115 -- the drain thread keeps it
    for line in server.stderr:
        log.write(line)
        if "framecast: serving" in line:
            log.flush()
            threading.Thread(target=drain, args=(server.stderr, log), daemon=True).start()
            return
    raise RuntimeError(f"framecast serve exited with {server.wait()}; see {data / 'server.log'}")


def drain(pipe: IO[str], log: IO[str]) -> None:
    for line in pipe:
        log.write(line)
        log.flush()


def session_processes(sid: int) -> list[tuple[int, str]]:
    """(pid, title) of every live process in session `sid`."""
    out = subprocess.run(["ps", "-eo", "pid=,sid=,args="], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        pid, session, *title = line.split(None, 2)
        if int(session) == sid:
            found.append((int(pid), title[0] if title else ""))
    return found


def stage_processes(sid: int, ready_only: bool = True) -> list[tuple[int, str, str]]:
    """(pid, deployment, title) of the server's stage processes (a rank counts as `DenoiserGroup rank`)."""
    stages = []
    for pid, title in session_processes(sid):
        match = STAGE_TITLE.match(title)
        if match and not (ready_only and any(mark in title for mark in STARTING)):
            stages.append((pid, match.group(1) or "DenoiserGroup rank", title))
    return stages


def chaos(sid: int, every: float, most: int, rng: random.Random, kills: list[Kill], done: threading.Event) -> None:
    """Every `every` seconds, SIGKILL one stage process of session `sid` (the next one up, if none is)."""
    due = time.monotonic() + every
    while len(kills) < most and not done.wait(max(0.0, due - time.monotonic())):
        targets = stage_processes(sid)
        if not targets:
            due = time.monotonic() + 1  # every stage is being (re)started: try again shortly
            continue
        pid, deployment, title = rng.choice(targets)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            due = time.monotonic()
            continue
        kills.append(Kill(time.monotonic(), deployment, pid, title))
        print(f"soak: killed {deployment} (pid {pid}) at kill {len(kills)}/{most}", file=sys.stderr, flush=True)
        due = time.monotonic() + every


def retry_after(error: openai.APIStatusError) -> float:
    try:
        return float(error.response.headers.get("retry-after", 1))
    except ValueError:
        return 1.0


def submit(
    client: openai.OpenAI, video: Video, body: dict[str, Any], tally: Tally, give_up: float, ended: threading.Event
) -> bool:
    """Create the video, retrying 429s, 5xxs and connection errors until `give_up` seconds have
    passed (or the server process has `ended`)."""
    video.first_try = time.monotonic()
    while time.monotonic() - video.first_try < give_up and not ended.is_set():
        try:
            created = client.videos.create(**body)
        except openai.RateLimitError as e:
            tally.count(e)
            time.sleep(retry_after(e))
            continue
        except (openai.APIConnectionError, openai.InternalServerError) as e:
            tally.count(e)
            time.sleep(RETRY_SLEEP_S)
            continue
        except openai.APIStatusError as e:
            tally.count(e)
            if e.status_code < 500:
                video.status, video.error_code = "refused", f"http_{e.status_code}"
                return False
            time.sleep(RETRY_SLEEP_S)
            continue
        video.id, video.status, video.created = created.id, created.status, time.monotonic()
        return True
    video.status = "unsubmitted"
    return False


def follow(
    client: openai.OpenAI, video: Video, tally: Tally, poll: float, deadline: list[float], ended: threading.Event
) -> None:
    """Poll the video until it is completed or failed, the drain deadline (once set) passes, or
    the server process has `ended`."""
    while time.monotonic() < deadline[0] and not ended.is_set():
        try:
            current = client.videos.retrieve(video.id)
        except openai.APIStatusError as e:
            tally.count(e)
            if e.status_code == 404:
                video.status, video.error_code = "vanished", "http_404"
                return
        except openai.APIConnectionError as e:
            tally.count(e)
        else:
            video.status, video.attempts = current.status, getattr(current, "attempts", None)
            if current.status in TERMINAL:
                video.finished = time.monotonic()
                video.error_code = current.error.code if current.error else None
                return
        time.sleep(poll)


def load(client: openai.OpenAI, args: argparse.Namespace, tally: Tally, ended: threading.Event) -> list[Video]:
    videos = [Video(n) for n in range(args.videos)]
    queue = iter(videos)
    lock, settled = threading.Lock(), [0]
    deadline = [float("inf")]  # set when the last video is submitted (or given up on)

    def body(n: int) -> dict[str, Any]:
        extra = {"steps": args.steps, "seed": n}
        return {"model": args.model, "prompt": PROMPT, "seconds": args.seconds, "size": args.size, "extra_body": extra}

    def worker() -> None:
        while True:
            with lock:
                video = next(queue, None)
            if video is None:
                return
            created = submit(client, video, body(video.n), tally, args.drain_timeout, ended)
            with lock:
                settled[0] += 1
                if settled[0] == len(videos):
                    deadline[0] = time.monotonic() + args.drain_timeout
            if created:
                follow(client, video, tally, args.poll, deadline, ended)

    threads = [threading.Thread(target=worker, name=f"client-{k}") for k in range(args.concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return videos


def server_side(client: openai.OpenAI) -> Counter:
    """The server's own count of its videos by status (every page of GET /v1/videos)."""
    counts: Counter = Counter()
    for video in client.videos.list(limit=100):
        counts[video.status] += 1
    return counts


def stop_server(server: subprocess.Popen) -> dict[str, Any]:
    """SIGINT, then SIGKILL to the whole session after STOP_TIMEOUT_S; what was left over."""
    sid, began = server.pid, time.monotonic()
    server.send_signal(signal.SIGINT)
    try:
        code = server.wait(timeout=STOP_TIMEOUT_S)
        forced = False
    except subprocess.TimeoutExpired:
        os.killpg(sid, signal.SIGKILL)
        code, forced = server.wait(), True
    left = session_processes(sid)  # Ray's workers have process groups of their own, in the session
    for _ in range(20):  # let the rest of Ray go down with it
        if not left:
            break
        time.sleep(0.5)
        left = session_processes(sid)
    for pid, _title in left:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    time.sleep(1)
    return {
        "exit_code": code,
        "stop_s": round(time.monotonic() - began, 1),
        "sigkilled": forced,
        "left_after_stop": [title for _pid, title in left],
        "alive_at_end": [title for _pid, title in session_processes(sid)],
    }


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def measure(videos: list[Video], kills: list[Kill]) -> dict[str, Any]:
    completed = [v for v in videos if v.status == "completed"]
    failed = [v for v in videos if v.status == "failed"]
    done_at = sorted(v.finished for v in completed)
    for kill in kills:
        after = next((t for t in done_at if t > kill.at), None)
        kill.recovery_s = None if after is None else round(after - kill.at, 2)
    latencies = [v.finished - v.first_try for v in completed]
    p50, p95 = percentile(latencies, 50), percentile(latencies, 95)
    starts = [v.first_try for v in videos if v.first_try is not None]
    wall = (max(done_at) - min(starts)) if done_at else 0.0
    recoveries = [k.recovery_s for k in kills]
    return {
        "submitted": sum(v.id is not None for v in videos),
        "completed": len(completed),
        "failed": len(failed),
        "failed_codes": dict(Counter(v.error_code for v in failed)),
        "lost": sum(v.id is not None and v.status not in TERMINAL for v in videos),
        "lost_last_status": dict(Counter(v.status for v in videos if v.id is not None and v.status not in TERMINAL)),
        "not_submitted": dict(Counter(v.status for v in videos if v.id is None)),
        "retried_by_server": sum((v.attempts or 0) > 1 for v in videos),
        "p50_s": None if p50 is None else round(p50, 2),
        "p95_s": None if p95 is None else round(p95, 2),
        "wall_s": round(wall, 1),
        "per_minute": round(60 * len(completed) / wall, 2) if wall else 0.0,
        "kills": len(kills),
        "longest_recovery_s": None if None in recoveries or not kills else max(recoveries),
        "recovery_never": sum(r is None for r in recoveries),
    }


def seconds(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def report(info: dict[str, Any]) -> str:
    r, t, k = info["results"], info["errors"], info["kills"]
    never = f" ({r['recovery_never']} kills were never followed by a completion)" if r["recovery_never"] else ""
    longest = "never recovered" if r["longest_recovery_s"] is None and k else seconds(r["longest_recovery_s"])
    lines = [
        f"{info['date']}, {info['machine']}; server start {info['server_start_s']:.1f} s",
        f"`{info['command']}`",
        f"server: `{info['server_command']}`, data and server.log in {info['data_dir']}",
        "",
        "| videos | submitted | completed | failed | lost | 429s | 5xx | connection errors | timeouts | other 4xx |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {info['args']['videos']} | {r['submitted']} | {r['completed']} | {r['failed']} | {r['lost']} "
        f"| {t['rate_limited']} | {sum(t['server_errors'].values())} | {t['connection_errors']} | {t['timeouts']} "
        f"| {sum(t['other_errors'].values())} |",
        "",
        "| p50 latency (s) | p95 (s) | completed/min | wall (s) | kills | longest recovery (s) | re-run by server |",
        "|---|---|---|---|---|---|---|",
        f"| {seconds(r['p50_s'])} | {seconds(r['p95_s'])} | {r['per_minute']:.1f} | {r['wall_s']:.1f} | {r['kills']} "
        f"| {longest}{never} | {r['retried_by_server']} |",
        "",
    ]
    if r["failed_codes"]:
        lines.append("failed, by error code: " + ", ".join(f"{c}: {n}" for c, n in r["failed_codes"].items()))
    if r["lost"]:
        lines.append("lost, by last status seen: " + ", ".join(f"{s}: {n}" for s, n in r["lost_last_status"].items()))
    if r["not_submitted"]:
        lines.append("never submitted: " + ", ".join(f"{s}: {n}" for s, n in r["not_submitted"].items()))
    if t["server_errors"] or t["other_errors"]:
        by_status = {**t["server_errors"], **t["other_errors"]}
        lines.append("HTTP errors by status: " + ", ".join(f"{s}: {n}" for s, n in sorted(by_status.items())))
    if info["server_ended_early"]:
        lines.append("**the server process exited during the run** (see server.log)")
    lines.append(f"the server's own count: {info['server_side'] or 'unavailable'}")
    stop = info["stop"]
    lines.append(f"stop: exit code {stop['exit_code']} after {stop['stop_s']} s"
                 f"{', SIGKILLed' if stop['sigkilled'] else ''}; left after it: {len(stop['left_after_stop'])}, "
                 f"alive at the end: {len(stop['alive_at_end'])}")  # fmt: skip
    if k:
        lines += ["", "| kill | at (s) | deployment | pid | recovery (s) |", "|---|---|---|---|---|"]
        lines += [f"| {i + 1} | {x['at_s']:.1f} | {x['deployment']} | {x['pid']} | {seconds(x['recovery_s'])} |"
                  for i, x in enumerate(k)]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--model", default="tiny", help="the model served (default tiny; a real one needs its weights)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seconds", default="1", help="the create request's seconds (default 1: 9 frames)")
    parser.add_argument("--size", default="96x64", help="the create request's size, WIDTHxHEIGHT")
    parser.add_argument("--poll", type=float, default=0.1, help="seconds between polls of a video")
    parser.add_argument("--kill-every", type=float, default=20.0, help="seconds between kills")
    parser.add_argument("--max-kills", type=int, default=8)
    parser.add_argument("--drain-timeout", type=float, default=300.0,
                        help="seconds to wait for the videos after the last submission")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="seeds the choice of what to kill")
    parser.add_argument("--max-queue", type=int, default=16)
    parser.add_argument("--runners", type=int, default=2)
    parser.add_argument("--port", type=int, default=0, help="default: a free one")
    parser.add_argument("--data-dir", type=Path, default=None, help="default: a new directory under the temp dir")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here as JSON")
    args = parser.parse_args()
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    warnings.filterwarnings("ignore", "The Sora API", DeprecationWarning)  # the client's, on every videos call
    # A process started in the background by a shell ignores SIGINT, and so would the server it
    # starts (an ignored signal stays ignored across exec): handled here, it is default there.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    data = (args.data_dir or Path(tempfile.mkdtemp(prefix="framecast-soak-"))).resolve()
    data.mkdir(parents=True, exist_ok=True)
    port = args.port or free_port()
    command = [sys.executable, "-m", "cluster.cli", "serve", "--model", args.model, "--host", HOST, "--port", str(port),
               "--data-dir", str(data), "--max-queue", str(args.max_queue), "--runners", str(args.runners)]  # fmt: skip
    began = time.monotonic()
    server = launch(command, data)
    ended = threading.Event()  # the server process exited (on its own, until stop_server)
    threading.Thread(target=lambda: (server.wait(), ended.set()), daemon=True).start()
    tally, kills, done = Tally(), [], threading.Event()
    client = openai.OpenAI(base_url=f"http://{HOST}:{port}/v1", api_key="unused", max_retries=0,
                           timeout=REQUEST_TIMEOUT_S)  # fmt: skip
    rng = random.Random(args.seed)
    chaos_thread = threading.Thread(target=chaos, args=(server.pid, args.kill_every, args.max_kills, rng, kills, done),
                                    daemon=True)  # fmt: skip
    counts = None
    try:
        wait_serving(server, data)
        started = time.monotonic() - began
        print(f"soak: serving on port {port} after {started:.1f} s; data in {data}", file=sys.stderr, flush=True)
        load_began = time.monotonic()
        chaos_thread.start()
        videos = load(client, args, tally, ended)
        ended_early = ended.is_set()
        done.set()
        chaos_thread.join()
        try:
            counts = dict(server_side(client))
        except openai.OpenAIError as e:
            print(f"soak: could not list the server's videos: {e}", file=sys.stderr)
    finally:
        done.set()
        stop = stop_server(server)
    info = {
        "date": datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.platform()}, {platform.machine()}, {os.cpu_count()} CPUs",
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "server_command": shlex.join(command),
        "data_dir": str(data),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "server_start_s": round(started, 1),
        "results": measure(videos, kills),
        "errors": tally.as_dict(),
        "kills": [{**asdict(k), "at_s": round(k.at - load_began, 1)} for k in kills],
        "server_side": counts,
        "server_ended_early": ended_early,
        "stop": stop,
        "videos": [v.as_dict() for v in videos],
    }
    for kill in info["kills"]:
        del kill["at"]
    print(report(info))
    if args.out:
        args.out.write_text(json.dumps(info, indent=2, default=str) + "\n")
    if stop["alive_at_end"]:
        sys.exit(f"soak: processes of the server's session are still alive: {stop['alive_at_end']}")


if __name__ == "__main__":
    main()
