"""One forward pass per calibration sample through a block, paused before each group of Linears until the
group is quantized.

GPTQ's true-sequential procedure calibrates a block's groups in order (q/k/v, o, gate/up, down for a llama
block), each on inputs computed with the groups before it already quantized. Run as passes, that is one pass
over the block per group, each from the block's start, and one more for the block's outputs: five for a llama
block, every earlier part recomputed each time. Here each sample's forward runs once, as a greenlet (a Python
call stack of its own on the same thread), and stops where the next group's first module is about to run; the
caller reads every sample's input to it, quantizes the group, and resumes the forwards to the next group, and
after the last to the block's outputs.

Why greenlets and not threads: a thread per sample gives each its own OpenMP team, and with more OpenMP threads
than cores the runtime stops spinning between parallel regions, which made every small tensor operation of the
caller about twice as slow; greenlets keep everything on the caller's thread and its one team. Grad mode is
per thread, so it is turned off once around all the forwards (a block whose forward changed such thread-wide
state across a Linear call would see the samples' changes interleaved; transformers' decoder blocks do not).

Why the result is the same: every part of the forward runs exactly as in the pass that would have computed it.
A part between two groups' modules runs after the first of them is quantized, as in the passes; the check on
every call below makes sure no Linear of a group that is not quantized yet runs out of turn (a block that calls
its groups in another order, or a sample that skips one: a mixture-of-experts block whose router sent it no
tokens). Such a call stops all the forwards (`OutOfOrder`), and the caller goes on with passes from that group.
The samples run one at a time, in order (tests/test_gptq.py compares codes, scales and outputs with the
passes').
"""

from __future__ import annotations

import torch
from torch import nn

from .calibration import BlockInputs
from .calls import first_output

try:
    import greenlet
except ImportError:     # an installation without it calibrates with passes
    greenlet = None


def available() -> bool:
    """Whether forwards can be paused here (greenlet is installed)."""
    return greenlet is not None


class OutOfOrder(Exception):
    """A forward reached a group's Linear before that group's turn, or ended before reaching it."""


class _Abort(BaseException):   # unwinds a paused forward that is not resumed (not an Exception: nothing catches it)
    pass


class PausedForwards:
    """groups: (inspect module, the group's Linears) in the order they are calibrated. Use as a context manager;
    `calls(k)` (k = 0, 1, ... in order, each after group k−1 is quantized) gives every sample's (args, kwargs) at
    group k's inspect module, `outputs()` (after the last group) the block's outputs."""

    def __init__(self, block: nn.Module, inputs: BlockInputs, groups: list[tuple[str, list[str]]]):
        self.block, self.inputs = block, inputs
        self.inspect = [g[0] for g in groups]
        self.group_of = {}
        for k, (inspect, names) in enumerate(groups):
            for n in (inspect, *names):
                self.group_of.setdefault(n, k)
        self.turn = 0                 # the group whose inputs are being collected; groups before it are quantized
        n = len(inputs.hidden)
        self.state: list = [None] * n
        self.forwards: list = [None] * n
        self.sample_of: dict = {}     # greenlet -> its sample
        self.caller = None
        self.abort = greenlet is None
        self.handles = []
        self.grad = None

    def __enter__(self):
        self.grad = torch.is_grad_enabled()
        torch.set_grad_enabled(False)
        for name in self.group_of:
            hook = (lambda name: lambda m, a, k: self._hook(name, a, k))(name)
            self.handles.append(self.block.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        self.close()
        torch.set_grad_enabled(self.grad)
        return False

    def close(self) -> None:
        """Unwind every forward still paused and remove the hooks."""
        self.abort = True
        for g in self.forwards:
            if g is not None and not g.dead:
                g.switch()            # raises _Abort at its pause, so that its stack unwinds
        self.forwards = [None] * len(self.forwards)
        self.sample_of.clear()
        for h in self.handles:
            h.remove()
        self.handles = []

    def calls(self, k: int) -> list[tuple[tuple, dict]]:
        if k != self.turn or self.abort:
            raise OutOfOrder(f"group {k} asked for out of turn" if greenlet else "greenlet is not installed")
        out = []
        for s in range(len(self.state)):
            self._resume(s)
            st = self.state[s]
            if st[0] != "at" or st[1] != self.inspect[k]:
                self.close()
                raise OutOfOrder(f"sample {s}: {st[1] if st[0] != 'done' else 'the end of the block'} reached "
                                 f"before {self.inspect[k]}")
            out.append((st[2], st[3]))
        self.turn = k + 1
        return out

    def outputs(self) -> list[torch.Tensor]:
        if self.turn != len(self.inspect) or self.abort:
            raise OutOfOrder("outputs asked for before every group is calibrated")
        out = []
        for s in range(len(self.state)):
            self._resume(s)
            st = self.state[s]
            if st[0] != "done":
                self.close()
                raise OutOfOrder(f"sample {s}: {st[1]} reached after the last group")
            out.append(st[1])
        self.close()
        return out

    # ---- the samples' forwards --------------------------------------------------------------------------
    def _resume(self, s: int) -> None:
        """Let sample s run until it pauses or ends."""
        self.caller = greenlet.getcurrent()
        if self.forwards[s] is None:
            self.forwards[s] = greenlet.greenlet(self._forward)
            self.sample_of[self.forwards[s]] = s
        self.forwards[s].switch(s)
        if self.state[s][0] == "error":
            error = self.state[s][1]
            self.close()
            raise error

    def _forward(self, s: int) -> None:
        try:
            y = self.block(self.inputs.hidden[s], **self.inputs.kwargs[s])
            self.state[s] = ("done", first_output(y))
        except _Abort:
            pass
        except OutOfOrder as e:
            self.state[s] = ("out of order", str(e))
        except BaseException as e:   # noqa: BLE001  (handed to the caller)
            self.state[s] = ("error", e)

    def _hook(self, name: str, args, kwargs) -> None:
        s = self.sample_of.get(greenlet.getcurrent()) if greenlet is not None else None
        if s is None:
            return                      # a call from elsewhere (not one of the paused forwards)
        k = self.group_of[name]
        if k < self.turn:
            return                      # its group is quantized
        if k > self.turn or name != self.inspect[k]:
            raise OutOfOrder(name)
        self.state[s] = ("at", name, args, dict(kwargs))
        self.caller.switch()            # pause: back to the caller until resumed (or unwound)
        if self.abort:
            raise _Abort
