"""Example enclave program: echo / sum / store, plus failure ECALLs for the runtime's tests."""

from __future__ import annotations

import os
import sys
import time

import torch

from shieldtune.crypto.framing import Frame
from shieldtune.errors import EnclaveError
from shieldtune.tee.program import EnclaveContext, EnclaveProgram

__all__ = ["PROGRAM"]

PROGRAM = EnclaveProgram("echo")


@PROGRAM.ecall("empty")
def empty(ctx: EnclaveContext, request: Frame) -> Frame:
    """Do nothing (round-trip latency)."""
    return Frame()


@PROGRAM.ecall("echo")
def echo(ctx: EnclaveContext, request: Frame) -> Frame:
    """Return the request unchanged."""
    return Frame(meta=dict(request.meta), tensors=dict(request.tensors))


@PROGRAM.ecall("sum")
def sum_(ctx: EnclaveContext, request: Frame) -> Frame:
    """Sum of all elements of tensor ``x`` (plus the stored ``bias``, if any)."""
    x = request.tensors["x"]  # (...)
    total = x.double().sum()  # ()
    if "bias" in ctx.state:
        total = total + ctx.state["bias"].double().sum()
    return Frame(meta={"n": x.numel()}, tensors={"sum": total.reshape(1)})


@PROGRAM.ecall("store")
def store(ctx: EnclaveContext, request: Frame) -> Frame:
    """Keep every request tensor in enclave state (sealed by ``Enclave.seal``)."""
    for name, tensor in request.tensors.items():
        ctx.state[name] = tensor.clone()
    stored: list[str | int | float | bool | None] = [name for name in sorted(ctx.state)]
    return Frame(meta={"stored": stored})


@PROGRAM.ecall("load")
def load(ctx: EnclaveContext, request: Frame) -> Frame:
    """Return the enclave state."""
    return Frame(tensors=dict(ctx.state))


@PROGRAM.ecall("info")
def info(ctx: EnclaveContext, request: Frame) -> Frame:
    """Measurement, config, whether this is a simulation, and the shieldtune modules loaded."""
    modules: list[str | int | float | bool | None] = [
        m for m in sorted(sys.modules) if m == "shieldtune" or m.startswith("shieldtune.")
    ]
    return Frame(
        meta={
            "measurement": ctx.measurement,
            "simulated": ctx.simulated,
            "pid": os.getpid(),
            "modules": modules,
            **ctx.config,
        }
    )


@PROGRAM.ecall("fail")
def fail(ctx: EnclaveContext, request: Frame) -> Frame:
    """Raise (tests: the enclave reports the error and keeps serving)."""
    raise EnclaveError("fail ECALL called")


@PROGRAM.ecall("sleep")
def sleep(ctx: EnclaveContext, request: Frame) -> Frame:
    """Sleep ``seconds`` (tests: timeouts and a death mid-call)."""
    time.sleep(request.meta_float("seconds", 1.0))
    return Frame()


@PROGRAM.ecall("crash")
def crash(ctx: EnclaveContext, request: Frame) -> Frame:
    """Exit the process abruptly (tests: crash detection)."""
    os._exit(request.meta_int("code", 3))


@PROGRAM.ecall("grow")
def grow(ctx: EnclaveContext, request: Frame) -> Frame:
    """Store a zero tensor of ``nbytes`` bytes (tests: the memory budget)."""
    ctx.state["ballast"] = torch.zeros(request.meta_int("nbytes"), dtype=torch.uint8)
    return Frame()
