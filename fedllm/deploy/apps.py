"""Module-level ServerApp and ClientApp for Flower's deployment engine (SuperLink + SuperNodes).

Simulation binds the recipe by closure (`make_server_app`, `make_client_app`); a deployed run
cannot, so the submitter (`fedllm run RECIPE --federation CONN`) sends the resolved recipe YAML as
the run config key `recipe` (and `resume`), and these apps rebuild it on each side. The app
folder Flower builds into a FAB names `fedllm.deploy.apps:server_app` /
`fedllm.deploy.apps:client_app`; fedllm
itself is installed on every machine beforehand (no run-time dependency installation).
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedllm.client import app as client
from fedllm.client.node_config import check_node, recipe_from_run_config
from fedllm.features import registry
from fedllm.server.app import run_server

server_app = ServerApp()
client_app = ClientApp()


@server_app.main()
def _serve(grid: Grid, context: Context) -> None:
    cfg = recipe_from_run_config(context.run_config)
    run_server(grid, cfg, resume=bool(context.run_config.get("resume", False)))


@client_app.train(mods=registry.client_mods())  # e.g. SecAgg+ masking; others pass through
def _train(msg: Message, context: Context) -> Message:
    cfg = recipe_from_run_config(context.run_config)
    check_node(cfg, context.node_config)
    return client.train(cfg, msg, context)


@client_app.evaluate()
def _evaluate(msg: Message, context: Context) -> Message:
    cfg = recipe_from_run_config(context.run_config)
    check_node(cfg, context.node_config)
    return client.evaluate(cfg, msg, context)
