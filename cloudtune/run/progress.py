"""Live progress of a job, rendered from the state db (which the watchdog fills from the store's
heartbeat). The CLI only reads here; it never drives the job, so detaching loses nothing."""

from __future__ import annotations

import sys
import time
from typing import Any

from cloudtune.run import state as S
from cloudtune.run.cost import job_cost_usd


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    s = int(max(0, seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def summary_line(db: S.StateDB, job: S.Job) -> str:
    step = f"{job.step}" if job.step is not None else "-"
    total = f"{job.total_steps}" if job.total_steps else "?"
    loss = f"{job.loss:.4f}" if job.loss is not None else "-"
    tps = f"{job.tokens_per_s:,.0f} tok/s" if job.tokens_per_s else "- tok/s"
    cost = job_cost_usd(db, job.id)
    return (
        f"{job.id} [{job.state}] attempt {job.current_attempt or '-'} | step {step}/{total} | loss {loss} | "
        f"{tps} | ${cost:.4f} | ETA {_eta(job.eta_s)}"
    )


def follow(db: S.StateDB, job_id: str, console, *, poll_s: float = 0.5, on_tick=None) -> S.Job:
    """Render until the job is terminal. Events print as lines; the status line updates in place
    on a terminal, and every 10 s (or on change) otherwise. Returns the final job row."""
    from rich.live import Live
    from rich.text import Text

    last_event = 0
    tty = console.is_terminal
    last_line, last_print = "", 0.0

    def new_events() -> list[dict[str, Any]]:
        nonlocal last_event
        evs = db.events(job_id, last_event)
        if evs:
            last_event = evs[-1]["id"]
        return evs

    def fmt(ev: dict[str, Any]) -> str:
        t = time.strftime("%H:%M:%S", time.localtime(ev["time"]))
        return f"{t} {ev['kind']}: {ev['message']}"

    live = Live(Text(""), console=console, refresh_per_second=4, transient=True) if tty else None
    if live:
        live.start()
    try:
        while True:
            if on_tick:
                on_tick()
            job = db.get_job(job_id)
            assert job is not None
            for ev in new_events():
                console.print(fmt(ev), markup=False, highlight=False)
            line = summary_line(db, job)
            if live:
                live.update(Text(line))
            elif line != last_line and time.time() - last_print >= 10 or job.is_terminal:
                console.print(line, markup=False, highlight=False)
                last_line, last_print = line, time.time()
            if job.is_terminal:
                for ev in new_events():
                    console.print(fmt(ev), markup=False, highlight=False)
                return job
            time.sleep(poll_s)
    finally:
        if live:
            live.stop()
            sys.stdout.flush()


def _clip(text: str | None, width: int = 40) -> str:
    text = "" if text is None else text
    return repr(text if len(text) <= width else text[: width - 1] + "…")


def learning_lines(summary: dict[str, Any]) -> list[str]:
    """What the finished job learned, from final/summary.json: the training loss, then held-out
    exact-match accuracy before and after the adapter and a few prompt → completion samples."""
    lines = []
    first, last = summary.get("first_loss"), summary.get("final_loss")
    if first is not None and last is not None:
        lines.append(f"training loss {first:.3f} -> {last:.3f} over {summary.get('steps')} steps "
                     f"({summary.get('tokens_per_s') or 0:,.0f} tokens/s)")
    gen = summary.get("generation_eval")
    if not gen or not gen.get("after"):
        return lines
    after, before = gen["after"], gen.get("before")

    def pct(score: dict[str, float] | None, key: str) -> str:
        return f"{score[key]:.0%}" if score else "n/a"

    lines.append(f"held-out prompts ({gen['examples']}, {gen.get('source') or 'validation'}, greedy), without -> with "
                 f"the adapter: exact match {pct(before, 'exact_match')} -> {pct(after, 'exact_match')}, "
                 f"per character {pct(before, 'char_accuracy')} -> {pct(after, 'char_accuracy')}")
    for s in gen.get("samples") or []:
        mark = "✓" if s.get("correct") else f"✗ (expected {_clip(s.get('expected'))})"
        base = f"  [base model: {_clip(s.get('before'))}]" if s.get("before") is not None else ""
        head = f"{s['instruction']} " if s.get("instruction") and s["instruction"] != s.get("prompt") else ""
        lines.append(f"  {head}{_clip(s.get('prompt'))} → {_clip(s.get('after'))} {mark}{base}")
    return lines
