"""Which rank the others wait for: a stalled rank (SIGSTOP, a hung filesystem) otherwise stalls every other
rank in silence until the collective timeout (an hour).

Two signs per rank, in torchrun's key-value store: its place in the loop (step and phase), published by the
loop just before each of its collectives, and a pulse, a counter a thread of its own bumps a few times per
interval. A thread on rank 0 watches rank 0's own place: once it has not moved for DIALSUM_HEARTBEAT_S
seconds (default 300), and again at every such interval, it logs the ranks it waits for: those behind it in
the loop (a rank stuck in its own work, such as a hung read), and those whose pulse has stopped (a paused or
dead process, even one stopped inside the collective rank 0 waits in). Rank 0 busy on its own (a long
validation) with every rank at its place and alive is not waiting, and says nothing."""

import os
import threading
import time

# Within one step, in loop order, each published just before the collectives it leads to: the window's token
# counts, the forward passes (FSDP gathers weights), the last backward (DDP and FSDP sync gradients), the
# loss sum; then validation (its loss sum, its ROUGE gather) and the save (the RNG gather, the final barrier).
PHASES = ("batch", "forward", "gradients", "loss", "validation", "validation sum", "validation ROUGE", "save",
          "saved")


def interval() -> float:
    return float(os.environ.get("DIALSUM_HEARTBEAT_S", "300"))


class Heartbeat:
    """beat(step, phase) from every rank's loop, pulse() from every rank's thread; on rank 0, check() (its
    thread calls it) logs whom it waits for."""

    def __init__(self, store, rank, world, log, every=None):
        self.store, self.rank, self.world, self.log = store, rank, world, log
        self.every = interval() if every is None else every
        self.mine, self.since, self.said = None, None, 0  # rank 0's place and since when (None: no beat yet)
        self.pulses, self.heard = (
            0,
            {},
        )  # this rank's pulse count; rank 0: {rank: (its count, when it last moved)}
        self.stopped = threading.Event()

    def beat(self, step, phase):
        position = (step, PHASES.index(phase))
        self._set(f"dialsum/heartbeat/{self.rank}", f"{position[0]} {position[1]}")
        if self.rank == 0:
            self.mine, self.since, self.said = position, time.monotonic(), 0

    def pulse(self):
        self.pulses += 1
        self._set(f"dialsum/pulse/{self.rank}", str(self.pulses))

    def _set(self, key, value):
        """A store that is gone (its launcher killed) silences the heartbeat; it never stops the run, whose
        own checks (training.launcher_gone) say what happened."""
        if self.stopped.is_set():
            return
        try:
            self.store.set(key, value)
        except Exception:  # noqa: BLE001 - any store failure: the watch ends, the run goes on
            self.stopped.set()

    def _read(self, kind, r, default):
        key = f"dialsum/{kind}/{r}"
        return self.store.get(key).decode() if self.store.check([key]) else default

    def check(self, now=None):
        """A line for every interval rank 0 has stood still, naming the ranks it waits for (None: nothing to
        say)."""
        now = time.monotonic() if now is None else now
        for r in range(1, self.world):  # when each rank's pulse last moved, on rank 0's clock
            count = self._read("pulse", r, "0")
            if self.heard.get(r, (None,))[0] != count:
                self.heard[r] = (count, now)
        if self.since is None:
            return None
        waited = now - self.since
        if waited < self.every * (self.said + 1):
            return None
        self.said += 1
        minutes = f"{waited / 60:.0f} min" if waited >= 60 else f"{waited:.0f} s"
        lines = []
        for r in range(1, self.world):
            place = tuple(map(int, self._read("heartbeat", r, "0 0").split()))
            silent = now - self.heard[r][1]
            if place < self.mine:
                lines.append(
                    f"waiting for rank {r} for {minutes}: it last reported {_where(place)}, rank 0 is at "
                    f"{_where(self.mine)}"
                )
            elif silent >= self.every:
                lines.append(
                    f"waiting for rank {r} for {minutes}: it has given no sign of life for {silent:.0f} s "
                    f"(paused, or its host is down), rank 0 is at {_where(self.mine)}"
                )
        if not lines:
            return None
        self.log("; ".join(lines))
        return "; ".join(lines)

    def start(self):
        """Every rank's pulse thread, which on rank 0 also checks (daemons: they never hold a process up)."""
        def run():
            while not self.stopped.wait(min(self.every / 4, 30)):
                self.pulse()
                if self.rank == 0 and not self.stopped.is_set():
                    try:
                        self.check()
                    except Exception:  # noqa: BLE001 - as in _set
                        self.stopped.set()
        threading.Thread(target=run, name="heartbeat", daemon=True).start()
        return self

    def stop(self):
        self.stopped.set()


def _where(position):
    step, phase = position
    return f"{PHASES[phase]} of step {step}" if step else "the start"
