"""``nlgen serve``: a loaded model behind the OpenAI HTTP API (nlgen.serve)."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from nlgen.cli import console, runtime
from nlgen.cli.options import (
    DeviceOpt,
    Dtype,
    DtypeOpt,
    ModelOpt,
    Quantize,
    QuantizeOpt,
    QuietOpt,
    TrustRemoteCodeOpt,
    VerboseOpt,
)
from nlgen.cli.runtime import guard
from nlgen.models import devices, spec
from nlgen.serve.options import DEFAULT_HOST, DEFAULT_PORT, ServeOptions

LIMITS = "Limits"


@guard
def serve(
    host: Annotated[str, typer.Option(
        "--host", help="Address to listen on. The default answers this machine only; "
        "0.0.0.0 answers every network (give --api-key then).")] = DEFAULT_HOST,
    port: Annotated[int, typer.Option(
        "--port", "-p", min=0, max=65535, help="Port to listen on (0: any free port).")]
    = DEFAULT_PORT,
    api_key: Annotated[Optional[str], typer.Option(
        "--api-key", envvar="NLGEN_API_KEY", show_envvar=True, show_default=False,
        help="Require 'Authorization: Bearer KEY' on every route but /health.")] = None,
    served_model_name: Annotated[Optional[str], typer.Option(
        "--served-model-name", show_default="the --model value",
        help="The model's name in /v1/models and in answers. A request's own 'model' field "
        "is accepted whatever it says: it never loads anything.")] = None,
    slots: Annotated[int, typer.Option(
        "--slots", help="Sequences decoded together (requests join the running batch).",
        rich_help_panel=LIMITS)] = 8,
    max_queue: Annotated[int, typer.Option(
        "--max-queue", help="Requests waiting for a slot; one more is answered 503 at once.",
        rich_help_panel=LIMITS)] = 64,
    max_n: Annotated[int, typer.Option(
        "--max-n", help="Sequences one request may ask for (n).", rich_help_panel=LIMITS)] = 16,
    max_body: Annotated[int, typer.Option(
        "--max-body", metavar="BYTES", help="Largest request body (beyond it: 413).",
        rich_help_panel=LIMITS)] = 1 << 20,
    drain_timeout: Annotated[float, typer.Option(
        "--drain-timeout", metavar="SECONDS", help="On SIGTERM, how long requests in flight "
        "may take to finish before they are cancelled.", rich_help_panel=LIMITS)] = 30.0,
    model: ModelOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = Dtype.auto,
    quantize: QuantizeOpt = Quantize.auto,
    trust_remote_code: TrustRemoteCodeOpt = False,
    verbose: VerboseOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Serve a model over the OpenAI API: completions, chat, streaming, many clients at once.

    Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /metrics,
    and GET /health (503 while the model loads).

    SIGTERM drains the requests in flight, then exits 0; Ctrl-C cancels them (exit 130).

    Examples:

      nlgen serve --model builtin

      NLGEN_API_KEY=secret nlgen serve --host 0.0.0.0 --port 8080

      curl localhost:8000/v1/completions -d '{"prompt": "Once upon a time"}'
    """
    devices.check_device_spec(device)
    options = ServeOptions(host=host, port=port, api_key=api_key,
                           served_name=served_model_name, slots=slots, max_queue=max_queue,
                           max_n=max_n, max_body=max_body, drain_timeout=drain_timeout)
    chosen = spec.choose_model(model)  # a model that is not there: said before listening
    from nlgen.engine import lean_weights
    from nlgen.models import loading
    from nlgen.serve.server import Server

    def load() -> loading.LoadedModel:
        lm = loading.load_model(chosen, device=device, dtype=dtype.value,
                                trust_remote_code=trust_remote_code, quantize=quantize.value,
                                lean_reader=lean_weights.read)
        runtime.use_spare_threads(lm)
        return lm

    def ready(lm: loading.LoadedModel) -> None:
        weights = "" if lm.quantization == "none" else f", {lm.quantization} weights"
        console.notice(f"{lm.name} on {lm.device} ({lm.dtype}{weights}) is ready at "
                       f"{server.url}/v1")

    server = Server(options, load, on_ready=ready)
    if not options.local_only and options.api_key is None:
        console.notice(f"listening on {host} without --api-key: anyone who reaches this port "
                       "can use the model")
    console.notice(f"listening on {server.url}; loading the model (GET /health: 200 when "
                   "ready)")
    runtime.exit_fast_when_done()  # the model's loading thread may still run after a stop
    with runtime.stop_signals(server.stop):
        server.run()
    if server.interrupted:
        raise KeyboardInterrupt  # guard: "Error: interrupted", exit 130
