"""Errors a person reads: a client's failure as one line, and a failed run as one line."""

from __future__ import annotations

import argparse

import pytest

from fedllm import cli
from fedllm.errors import RunFailed, short_reason

RAY_TRACE = """ray::ClientAppActor.run() (pid=31438, ip=192.0.2.2, repr=<ClientAppActor object>)
  File "/site-packages/flwr/clientapp/client_app.py", line 161, in __call__
    return self._registered_funcs[full_name](message, context)
  File "/site-packages/torch/optim/adam.py", line 546, in _single_tensor_adam
    param.addcdiv_(exp_avg, denom, value=-step_size)
RuntimeError: value cannot be converted to type float without overflow

The above exception was the direct cause of the following exception:

ray::ClientAppActor.run() (pid=31438, ip=192.0.2.2)
  File "/site-packages/flwr/simulation/ray_transport/ray_actor.py", line 65, in run
    raise ClientAppException(str(ex)) from ex
flwr.clientapp.client_app.ClientAppException: 
Exception ClientAppException occurred. Message: value cannot be converted to type float without overflow"""  # noqa: E501, W291


def test_a_ray_workers_report_is_its_clients_error_message() -> None:
    # as Flower's simulation engine builds it: str(type(ex)) + ":<'" + str(ex) + "'>"
    reason = "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'" + RAY_TRACE + "'>"
    assert len(reason.splitlines()) > 10
    assert short_reason(reason) == "value cannot be converted to type float without overflow"


@pytest.mark.parametrize(
    ("reason", "expected"),
    [
        ("Traceback (most recent call last):\n  File x\nValueError: bad\n", "ValueError: bad"),
        ("KeyError: 'metrics'", "KeyError: 'metrics'"),
        ("the node went away", "the node went away"),  # no exception line: as it is
        ("", ""),
    ],
)
def test_a_plain_report_keeps_its_innermost_exception_line(reason: str, expected: str) -> None:
    assert short_reason(reason) == expected


def test_a_long_message_is_cut() -> None:
    assert short_reason("ValueError: " + "x" * 1000, limit=50) == "ValueError: " + "x" * 37 + "…"


def test_a_failed_run_is_one_line_and_exit_1(monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    def fails(args: argparse.Namespace) -> int:
        raise RunFailed("round 1: every client failed (first error: out of memory)")

    monkeypatch.setattr(
        cli, "parse", lambda argv: argparse.Namespace(fn=fails, verbose=False, flower_service=False)
    )
    assert cli.main([]) == 1
    assert capsys.readouterr().err == (
        "fedllm: error: round 1: every client failed (first error: out of memory)\n"
    )


def test_a_multi_line_client_message_is_kept_whole() -> None:
    """A client's ConfigError names the bad key on its second line."""
    trace = (
        "ray::ClientAppActor.run()\nfedllm.recipe.checks.ConfigError: invalid recipe:\n"
        "Exception ClientAppException occurred. Message: invalid recipe run config 'recipe':\n"
        "  federation.rounds: Input should be greater than 0 (got 0)"
    )
    reason = "<class 'ray.exceptions.RayTaskError(ClientAppException)'>:<'" + trace + "'>"
    assert short_reason(reason) == (
        "invalid recipe run config 'recipe': federation.rounds: Input should be greater than 0 "
        "(got 0)"
    )
