"""One private training run: the body of ``agent train`` (its own process; torch, peft, opacus).

    consented conversations -> examples -> plan and CHARGE the ledger -> base model + LoRA
    -> held-out loss -> DP-SGD (opacus: Poisson sampling, per-example clipping, Gaussian noise)
    -> held-out loss -> guard -> adapter GGUF (+ the fleet update) -> ledger outcome

The charge is on disk (fsynced) before the first step. The process runs at the lowest CPU and IO
priority; SIGTERM (or :meth:`StopSignal.request`) stops it at the next step boundary with a
checkpoint, and the next run resumes that checkpoint under the same charge. A run that would exceed
the budget does not start (:class:`agent.errors.BudgetExceeded`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from numpy.typing import NDArray
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from agent.config import AgentConfig
from agent.errors import AdapterError, AgentError, ConfigError, PrivacyError
from agent.train.checkpoint import (
    CheckpointError,
    CheckpointState,
    clear_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from agent.train.dataset import ConversationSource, DatasetSplit, Example, build_dataset
from agent.train.export import check_trained, ffa_b_matrices, read_lora_gguf, write_lora_gguf
from agent.train.kinds import AdapterKind, GradSampleMode, RunStatus
from agent.train.ledger import LedgerRun, PrivacyLedger
from agent.train.lora import (
    LoraSettings,
    LoraTarget,
    adapter_file,
    attach_lora,
    b_matrices,
    load_base_model,
    load_lora_weights,
    lora_weights,
)
from agent.train.privacy import Mechanism, check_delta, plan_run, steps_for
from agent.train.process import StopSignal, TrainStopped, lower_priority
from agent.train.tokenizer import ChatTokenizer, LlamaVocab
from agent.train.update import B_SUFFIX, FleetDeltaHeader, read_fleet_delta, write_fleet_delta

log = logging.getLogger("agent.train")

Clock = Callable[[], float]
StepHook = Callable[[str, int], None]
FloatArray = NDArray[np.float32]


class NotEnoughData(AgentError):
    """Too few consented conversations to train on privately."""

    exit_code = 75  # EX_TEMPFAIL: try again later


class TrainBusy(AgentError):
    """Another run of the same adapter is in progress."""

    exit_code = 75


class ExportRefused(AgentError):
    """Training ran (and was charged) but the result failed the export guard."""

    exit_code = 65  # EX_DATAERR


# -- inputs -------------------------------------------------------------------------------------------


class FleetRound(BaseModel):
    """What the trainer needs from a round announcement (:class:`fleet.messages.RoundSpec`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    round_id: int = Field(ge=1)
    ffa_seed: int = Field(ge=0, le=2**63 - 1)
    rank: int = Field(ge=1, le=256)
    alpha: float = Field(gt=0.0)
    target_modules: tuple[str, ...] = Field(min_length=1)
    learning_rate: float = Field(gt=0.0, le=10.0)
    local_epochs: int = Field(ge=1, le=100)
    epsilon: float = Field(gt=0.0)
    """The most this round's run may spend on its own."""
    delta: float = Field(gt=0.0, lt=1.0)
    base_model_sha256: str | None = None


def load_round_spec(path: Path) -> FleetRound:
    """A round spec file: the JSON of a :class:`fleet.messages.RoundSpec` header (``kind``/``v`` and
    its fields) as the fleet client saves it."""
    from fleet.errors import FleetError
    from fleet.messages import RoundSpec

    try:
        header = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"cannot read the round spec {path}: {exc}") from None
    if not isinstance(header, dict):
        raise ConfigError(f"{path}: a round spec is a JSON object")
    try:
        spec = RoundSpec.from_parts(header) if "kind" in header else RoundSpec.model_validate(header)
    except (FleetError, ValidationError) as exc:
        raise ConfigError(f"{path}: not a valid round spec: {exc}") from None
    return FleetRound(
        round_id=spec.round_id,
        ffa_seed=spec.lora.ffa_seed,
        rank=spec.lora.rank,
        alpha=spec.lora.alpha,
        target_modules=tuple(spec.lora.target_modules),
        learning_rate=spec.learning_rate,
        local_epochs=spec.local_epochs,
        epsilon=spec.privacy.epsilon,
        delta=spec.privacy.delta,
        base_model_sha256=spec.base_model_sha256,
    )


class TrainRequest(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    adapter: AdapterKind = AdapterKind.PERSONAL
    round: FleetRound | None = None
    init_b: Path | None = None
    """Fleet: the B matrices to start from: the global fleet adapter GGUF (built for this round's
    seed, :func:`agent.train.export.build_ffa_adapter`) or a fleet delta file."""
    max_steps: int | None = Field(default=None, ge=1)
    out_dir: Path | None = None
    """Where adapters and the result go; unset: ``<state_dir>/adapters``."""


class TrainResult(BaseModel):
    """What a run did; printed as JSON by ``agent train`` and saved beside the adapters."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    status: Literal["completed", "stopped", "refused"]
    reason: str | None = None
    run_id: str
    adapter: AdapterKind
    round_id: int | None = None
    resumed: bool
    steps_done: int
    planned_steps: int
    noise_multiplier: float
    sample_rate: float
    max_grad_norm: float
    epsilon_run: float
    epsilon_period_after: float
    delta: float
    grad_sample_mode: GradSampleMode
    n_train: int
    n_holdout: int
    holdout_loss_before: float | None
    holdout_loss_after: float | None
    train_loss_first: float | None
    train_loss_last: float | None
    adapter_path: str | None = None
    update_path: str | None = None
    seconds: float


# -- process settings ------------------------------------------------------------------------------------

# -- the torch side -----------------------------------------------------------------------------------


class _Examples(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    def __init__(self, examples: Sequence[Example]) -> None:
        self._items = [
            (torch.tensor(e.input_ids, dtype=torch.long), torch.tensor(e.targets, dtype=torch.bool))
            for e in examples
        ]

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self._items[index]


def collate(batch: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """Right-pad to the longest example: (input_ids, attention_mask, targets), all [B, T]."""
    longest = max(ids.shape[0] for ids, _ in batch)
    n = len(batch)
    ids = torch.zeros((n, longest), dtype=torch.long)
    attention = torch.zeros((n, longest), dtype=torch.long)
    targets = torch.zeros((n, longest), dtype=torch.bool)
    for i, (x, t) in enumerate(batch):
        ids[i, : x.shape[0]] = x
        attention[i, : x.shape[0]] = 1
        targets[i, : t.shape[0]] = t
    return ids, attention, targets


def example_losses(
    model: Any, ids: torch.Tensor, attention: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Each example's mean cross-entropy over its assistant tokens, shape [B]."""
    logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits[:, :-1, :]
    b, t, v = logits.shape
    nll = F.cross_entropy(logits.reshape(b * t, v).float(), ids[:, 1:].reshape(b * t), reduction="none")
    mask = targets[:, 1:].to(nll.dtype).reshape(b, t)
    return (nll.reshape(b, t) * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


def mean_loss(model: Any, examples: Sequence[Example], *, batch_size: int = 8) -> float | None:
    """The held-out loss: the mean over examples of each example's loss (None without examples)."""
    if not examples:
        return None
    total = 0.0
    was_training = model.training
    model.eval()
    with torch.no_grad():
        data = _Examples(examples)
        for start in range(0, len(data), batch_size):
            ids, attention, targets = collate(
                [data[i] for i in range(start, min(len(data), start + batch_size))]
            )
            total += float(example_losses(model, ids, attention, targets).sum())
    model.train(was_training)
    return total / len(examples)


def _noise_only_step(dp_opt: Any, grad_mode: GradSampleMode) -> None:
    """An optimizer step for an empty Poisson batch: zero clipped sum, plus noise (transformers'
    models do not run on an empty batch)."""
    for p in dp_opt.params:
        if grad_mode is GradSampleMode.GHOST:
            p.grad = torch.zeros_like(p)
        else:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
    dp_opt.step()
    dp_opt.zero_grad(set_to_none=True)


def _optimizer_tensors(optimizer: Any, names: dict[int, str]) -> dict[str, FloatArray]:
    out: dict[str, FloatArray] = {}
    for index, state in optimizer.state_dict()["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                out[f"opt/{names[index]}/{key}"] = (
                    value.detach().float().cpu().numpy().reshape(value.shape or (1,))
                )
    return out


def _restore_optimizer(optimizer: Any, names: dict[int, str], tensors: dict[str, FloatArray]) -> None:
    full = optimizer.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for index, name in names.items():
        prefix = f"opt/{name}/"
        entries = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        if entries:
            state[index] = {
                k: (torch.tensor(float(v.reshape(-1)[0])) if k == "step" else torch.from_numpy(v.copy()))
                for k, v in entries.items()
            }
    optimizer.load_state_dict({"state": state, "param_groups": full["param_groups"]})


# -- the run ----------------------------------------------------------------------------------------


@dataclass
class _Run:
    ledger_run: LedgerRun
    resumed: bool
    steps_done: int
    holdout_before: float | None
    train_loss_first: float | None
    init: dict[str, FloatArray] | None
    weights: dict[str, FloatArray] | None
    opt: dict[str, FloatArray]


def _fingerprint(parts: Sequence[object]) -> str:
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:32]


def _file_identity(path: Path | None) -> str:
    if path is None:
        return "-"
    try:
        st = path.stat()
    except OSError:
        return f"{path}:missing"
    return f"{path}:{st.st_size}:{st.st_mtime_ns}"


def _model_path(cfg: AgentConfig) -> Path:
    if cfg.model.path is not None:
        return cfg.model.path
    from agent.model.demo import DemoModel, build_key, default_cache_dir

    key = build_key()
    demo = DemoModel.at(default_cache_dir() / "demo-model" / key, key)
    if not demo.manifest.is_file():
        raise ConfigError("model.path is not set and the demo model is not built (agent model build-demo)")
    log.warning("model.path is not set: training on the demo model %s (development only)", demo.q4_k_m)
    return demo.q4_k_m


def train(
    cfg: AgentConfig,
    request: TrainRequest,
    *,
    source: ConversationSource,
    stop: StopSignal | None = None,
    clock: Clock = time.time,
    on_step: StepHook | None = None,
) -> TrainResult:
    """One private training run (see the module doc). Raises BudgetExceeded, NotEnoughData,
    ExportRefused and other :class:`AgentError` subclasses. ``on_step(run_id, steps_done)`` is
    called after each DP-SGD step (progress reporting, tests)."""
    started = time.monotonic()
    stop = stop or StopSignal()
    tc = cfg.train
    kind = request.adapter
    rnd = request.round
    if kind is AdapterKind.FLEET and rnd is None:
        raise ConfigError("a fleet run needs the round spec (--round-spec)")
    if kind is AdapterKind.PERSONAL and (rnd is not None or request.init_b is not None):
        raise ConfigError("--round-spec and --init-b are for the fleet adapter")
    if cfg.privacy.secure_mode:
        try:
            import torchcsprng  # noqa: F401
        except ImportError:
            raise PrivacyError(
                "privacy.secure_mode needs the torchcsprng package, which is not installed"
            ) from None
    for note in lower_priority(nice=tc.nice, idle_io=tc.idle_io):
        log.debug("priority: %s", note)
    torch.set_num_threads(tc.threads or os.cpu_count() or 1)
    if tc.seed is not None:
        torch.manual_seed(tc.seed)
    grad_mode = tc.grad_sample_mode
    gguf_path = _model_path(cfg)
    out_dir = request.out_dir or cfg.adapters_dir
    ckpt_dir = cfg.train_dir / kind.value
    ledger = PrivacyLedger(cfg.ledger_path, clock=clock)

    if rnd is not None:
        settings = LoraSettings(
            kind=kind,
            rank=rnd.rank,
            alpha=rnd.alpha,
            target_modules=rnd.target_modules,
            ffa_seed=rnd.ffa_seed,
        )
        epochs: float = float(rnd.local_epochs)
        lr = rnd.learning_rate
    else:
        settings = LoraSettings(
            kind=kind, rank=tc.lora_rank, alpha=tc.lora_alpha, target_modules=tc.target_modules
        )
        epochs, lr = tc.epochs, tc.learning_rate
    init_b: dict[str, FloatArray] | None = None
    if request.init_b is not None:
        init_b = _load_init_b(request.init_b, settings)
    fingerprint = _fingerprint(
        [
            _file_identity(gguf_path),
            _file_identity(tc.base_weights_dir),
            settings,
            None if rnd is None else rnd.round_id,
            _file_identity(request.init_b),
            tc.max_grad_norm,
            tc.batch_size,
            lr,
            grad_mode.value,
        ]
    )

    with _adapter_lock(cfg.train_dir / f"{kind.value}.lock"):
        return _train_locked(
            cfg,
            request,
            source=source,
            stop=stop,
            clock=clock,
            on_step=on_step,
            started=started,
            settings=settings,
            epochs=epochs,
            lr=lr,
            init_b=init_b,
            fingerprint=fingerprint,
            gguf_path=gguf_path,
            out_dir=out_dir,
            ckpt_dir=ckpt_dir,
            ledger=ledger,
        )


def _load_init_b(path: Path, settings: LoraSettings) -> dict[str, FloatArray]:
    """The B matrices a fleet run starts from: the fleet's global adapter GGUF (its A must be this
    round's seeded A) or a fleet delta file of the same seed and rank."""
    assert settings.ffa_seed is not None
    if path.suffix == ".gguf":
        try:
            b = ffa_b_matrices(read_lora_gguf(path), ffa_seed=settings.ffa_seed)
        except AdapterError as exc:
            raise ConfigError(f"--init-b {path}: {exc}") from None
    else:
        header, b = read_fleet_delta(path)
        if header.ffa_seed != settings.ffa_seed:
            raise ConfigError(f"--init-b {path}: its B matrices are for seed {header.ffa_seed}")
    if any(m.shape[1] != settings.rank for m in b.values()):
        raise ConfigError(f"--init-b {path}: its B matrices are not of rank {settings.rank}")
    return b


@contextlib.contextmanager
def _adapter_lock(path: Path) -> Iterator[None]:
    """One run per adapter kind at a time (they share a checkpoint and output files)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TrainBusy(f"another {path.stem} training run is in progress") from None
        yield
    finally:
        os.close(fd)


def _train_locked(
    cfg: AgentConfig,
    request: TrainRequest,
    *,
    source: ConversationSource,
    stop: StopSignal,
    clock: Clock,
    on_step: StepHook | None,
    started: float,
    settings: LoraSettings,
    epochs: float,
    lr: float,
    init_b: dict[str, FloatArray] | None,
    fingerprint: str,
    gguf_path: Path,
    out_dir: Path,
    ckpt_dir: Path,
    ledger: PrivacyLedger,
) -> TrainResult:
    tc, pc = cfg.train, cfg.privacy
    kind, rnd, budget, grad_mode = request.adapter, request.round, pc.budget, tc.grad_sample_mode
    _remove_stale_temporaries(kind, out_dir, ckpt_dir)
    vocab = LlamaVocab(gguf_path)
    try:
        tok = ChatTokenizer(vocab, template_override=cfg.model.chat_template)

        def dataset_for(charged_at: float) -> DatasetSplit:
            return build_dataset(
                source,
                tok,
                created_after=charged_at - budget.period_s,
                created_until=charged_at,
                system_prompt=cfg.model.system_prompt,
                max_seq_len=tc.max_seq_len,
                holdout_fraction=tc.holdout_fraction,
            )

        run = _resume(ledger, ckpt_dir, kind=kind, fingerprint=fingerprint)
        if run is not None:
            data = dataset_for(run.ledger_run.charged_at)
            log.info("resuming run %s at step %d", run.ledger_run.run_id, run.steps_done)
        else:
            if stop.is_set():
                raise TrainStopped(f"stopped before training ({stop.reason}); nothing was charged")
            now = clock()
            data = dataset_for(now)
            n = len(data.train)
            if n < tc.min_examples:
                raise NotEnoughData(
                    f"{n} consented conversations to train on (at least {tc.min_examples} needed; "
                    f"{len(data.holdout)} held out, {data.skipped} unusable)"
                )
            check_delta(delta=budget.delta, n_examples=n)
            sample_rate = 1.0 / math.ceil(n / tc.batch_size)
            max_steps = min(s for s in (request.max_steps, tc.max_steps, 10_000_000) if s is not None)
            steps = steps_for(epochs=epochs, sample_rate=sample_rate, max_steps=max_steps)
            cap = None if rnd is None else rnd.epsilon

            def planner(history: Sequence[Mechanism]) -> Any:
                return plan_run(
                    budget=budget,
                    history=history,
                    sample_rate=sample_rate,
                    steps=steps,
                    run_fraction=pc.run_fraction,
                    accountants=pc.accountants,
                    run_epsilon_cap=cap,
                )

            charged = ledger.charge(
                budget=budget,
                plan=planner,
                adapter=kind,
                round_id=None if rnd is None else rnd.round_id,
                accountants=pc.accountants,
            )
            log.info(
                "charged run %s: epsilon %.4g (period %.4g of %g), noise %.4g, q %.4g, %d steps",
                charged.run_id,
                charged.epsilon_run,
                charged.epsilon_period_after,
                budget.epsilon,
                charged.mechanism.noise_multiplier,
                charged.mechanism.sample_rate,
                charged.mechanism.steps,
            )
            run = _Run(charged, False, 0, None, None, None, None, {})
            # Only conversations inside the window as charged (a hair later than ``now``).
            cutoff = charged.charged_at - budget.period_s
            data = DatasetSplit(
                train=tuple(e for e in data.train if e.created > cutoff),
                holdout=tuple(e for e in data.holdout if e.created > cutoff),
                skipped=data.skipped,
            )
        return _train_charged(
            cfg,
            run,
            data,
            settings=settings,
            lr=lr,
            grad_mode=grad_mode,
            gguf_path=gguf_path,
            init_b=init_b,
            init_b_name=None if request.init_b is None else request.init_b.name,
            rnd=rnd,
            ledger=ledger,
            ckpt_dir=ckpt_dir,
            out_dir=out_dir,
            fingerprint=fingerprint,
            stop=stop,
            started=started,
            on_step=on_step,
        )
    finally:
        vocab.close()


def _remove_stale_temporaries(kind: AdapterKind, out_dir: Path, ckpt_dir: Path) -> None:
    """Temporary files of this kind's writers that were killed before their rename are garbage (we
    hold the kind's lock, so no live writer owns them)."""
    patterns = {
        AdapterKind.PERSONAL: (".personal.gguf.*.tmp", ".personal-result.json.*.tmp"),
        AdapterKind.FLEET: (
            ".fleet-local.gguf.*.tmp",
            ".fleet-update-r*.ppcf.*.tmp",
            ".fleet-result.json.*.tmp",
        ),
    }[kind]
    found = [t for pattern in patterns for t in out_dir.glob(pattern)] + list(ckpt_dir.glob(".*.tmp"))
    for tmp in found:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _resume(ledger: PrivacyLedger, ckpt_dir: Path, *, kind: AdapterKind, fingerprint: str) -> _Run | None:
    try:
        found = load_checkpoint(ckpt_dir)
    except CheckpointError as exc:
        log.warning("ignoring the checkpoint: %s", exc)
        clear_checkpoint(ckpt_dir)
        return None
    if found is None:
        return None
    state, tensors = found
    lrun = ledger.run(state.run_id)
    usable = (
        lrun is not None
        and state.adapter is kind
        and state.fingerprint == fingerprint
        and lrun.status in (RunStatus.CHARGED, RunStatus.STOPPED)
        and state.steps_done < lrun.mechanism.steps
    )
    if not usable or lrun is None:
        log.info("not resuming the checkpoint of run %s (different settings or finished)", state.run_id)
        if lrun is not None and lrun.status in (RunStatus.CHARGED, RunStatus.STOPPED):
            ledger.finish(lrun.run_id, status=RunStatus.FAILED, steps_done=state.steps_done, note="abandoned")
        clear_checkpoint(ckpt_dir)
        return None
    init = {k[len("init/") :]: v for k, v in tensors.items() if k.startswith("init/")}
    weights = {k[len("lora/") :]: v for k, v in tensors.items() if k.startswith("lora/")}
    opt = {k: v for k, v in tensors.items() if k.startswith("opt/")}
    return _Run(
        lrun, True, state.steps_done, state.holdout_before, state.train_loss_first, init, weights, opt
    )


def _make_private(
    cfg: AgentConfig,
    *,
    model: Any,
    optimizer: torch.optim.Optimizer,
    dataset: _Examples,
    mechanism: Mechanism,
    grad_mode: GradSampleMode,
) -> tuple[Any, Any, Any, Any]:
    from opacus import PrivacyEngine
    from opacus.data_loader import DPDataLoader

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Secure RNG turned off")
            engine = PrivacyEngine(accountant="prv", secure_mode=cfg.privacy.secure_mode)
    except ImportError as exc:
        raise PrivacyError(f"privacy.secure_mode needs torchcsprng: {exc}") from None
    generator = None
    if cfg.train.seed is not None and not cfg.privacy.secure_mode:
        generator = torch.Generator().manual_seed(cfg.train.seed + 1)
    # Poisson sampling at exactly the charged rate (not 1/len(loader)).
    loader = DPDataLoader(
        dataset,
        sample_rate=mechanism.sample_rate,
        collate_fn=collate,
        generator=engine.secure_rng if cfg.privacy.secure_mode else generator,
    )
    common: dict[str, Any] = {
        "module": model,
        "optimizer": optimizer,
        "data_loader": loader,
        "noise_multiplier": mechanism.noise_multiplier,
        "max_grad_norm": cfg.train.max_grad_norm,
        "poisson_sampling": False,  # the loader above already samples
        "noise_generator": generator,
    }
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module="opacus")
        if grad_mode is GradSampleMode.GHOST:
            dp_model, dp_opt, _criterion, dp_loader = engine.make_private(
                **common, grad_sample_mode="ghost", criterion=torch.nn.CrossEntropyLoss()
            )
        else:
            dp_model, dp_opt, dp_loader = engine.make_private(**common, grad_sample_mode="hooks")
    # make_private derives the expected batch size from len(loader); use the charged rate's.
    dp_opt.expected_batch_size = max(1, round(len(dataset) * mechanism.sample_rate))
    return engine, dp_model, dp_opt, dp_loader


def _train_charged(
    cfg: AgentConfig,
    run: _Run,
    data: DatasetSplit,
    *,
    settings: LoraSettings,
    lr: float,
    grad_mode: GradSampleMode,
    gguf_path: Path,
    init_b: dict[str, FloatArray] | None,
    init_b_name: str | None,
    rnd: FleetRound | None,
    ledger: PrivacyLedger,
    ckpt_dir: Path,
    out_dir: Path,
    fingerprint: str,
    stop: StopSignal,
    started: float,
    on_step: StepHook | None,
) -> TrainResult:
    from opacus.utils.fast_gradient_clipping_utils import DPTensorFastGradientClipping

    tc = cfg.train
    lrun = run.ledger_run
    mech = lrun.mechanism
    steps_done = run.steps_done
    try:
        model, info = load_base_model(gguf_path=gguf_path, base_weights_dir=tc.base_weights_dir)
        peft_model, targets = attach_lora(model, info, settings, init_b=init_b)
        if run.weights is not None:
            load_lora_weights(peft_model, targets, run.weights)
        init = run.init if run.init is not None else lora_weights(peft_model, targets)
        holdout_before = run.holdout_before if run.resumed else mean_loss(peft_model, data.holdout)
        if not data.train:
            raise NotEnoughData("no training examples are left in the charged run's window")
        dataset = _Examples(data.train)
        trainable = [(n, p) for n, p in peft_model.named_parameters() if p.requires_grad]
        names = {i: n for i, (n, _) in enumerate(trainable)}
        optimizer = torch.optim.Adam([p for _, p in trainable], lr=lr)
        if run.opt:
            _restore_optimizer(optimizer, names, run.opt)
        peft_model.train()
        engine, dp_model, dp_opt, dp_loader = _make_private(
            cfg, model=peft_model, optimizer=optimizer, dataset=dataset, mechanism=mech, grad_mode=grad_mode
        )
    except AgentError as exc:
        ledger.finish(lrun.run_id, status=RunStatus.FAILED, steps_done=steps_done, note=str(exc))
        raise
    log.info(
        "training %s adapter: %d examples (%d held out), %d steps left, %s clipping",
        settings.kind.value,
        len(data.train),
        len(data.holdout),
        mech.steps - steps_done,
        grad_mode.value,
    )

    def checkpoint() -> None:
        tensors: dict[str, FloatArray] = {}
        tensors.update({f"init/{k}": v for k, v in init.items()})
        tensors.update({f"lora/{k}": v for k, v in lora_weights(peft_model, targets).items()})
        tensors.update(_optimizer_tensors(optimizer, names))
        state = CheckpointState(
            run_id=lrun.run_id,
            adapter=settings.kind,
            round_id=None if rnd is None else rnd.round_id,
            ffa_seed=settings.ffa_seed,
            fingerprint=fingerprint,
            steps_done=steps_done,
            planned_steps=mech.steps,
            charged_at=lrun.charged_at,
            holdout_before=holdout_before,
            train_loss_first=first_loss,
            weights_file="weights-00000000.safetensors",
        )
        save_checkpoint(ckpt_dir, state, tensors)

    first_loss = run.train_loss_first
    if not run.resumed:
        checkpoint()  # step 0: a run killed from here on resumes under its charge, not a new one
    recent: list[float] = []
    stopped = False
    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
    while steps_done < mech.steps and not stopped:
        for batch in dp_loader:
            if stop.is_set():
                stopped = True
                break
            if len(batch) != 3 or batch[0].shape[0] == 0:
                # Poisson sampling drew nobody (opacus may give an empty batch of another
                # structure): the step still adds its noise, and it is accounted.
                _noise_only_step(dp_opt, grad_mode)
            else:
                ids, attention, targets_mask = batch
                losses = example_losses(dp_model, ids, attention, targets_mask)
                if grad_mode is GradSampleMode.GHOST:
                    dp_loss: Any = DPTensorFastGradientClipping(dp_model, dp_opt, losses, "mean")
                    dp_loss.backward()
                else:
                    mean: Any = losses.mean()
                    mean.backward()
                dp_opt.step()
                dp_opt.zero_grad(set_to_none=True)
                value = float(losses.detach().mean())
                first_loss = value if first_loss is None else first_loss
                recent = [*recent[-9:], value]
            steps_done += 1
            if on_step is not None:
                on_step(lrun.run_id, steps_done)
            if steps_done % tc.checkpoint_every == 0 and steps_done < mech.steps:
                checkpoint()
            if steps_done >= mech.steps:
                break
        if stop.is_set() and steps_done < mech.steps:
            stopped = True
    del engine

    result_common: dict[str, Any] = {
        "run_id": lrun.run_id,
        "adapter": settings.kind,
        "round_id": None if rnd is None else rnd.round_id,
        "resumed": run.resumed,
        "steps_done": steps_done,
        "planned_steps": mech.steps,
        "noise_multiplier": mech.noise_multiplier,
        "sample_rate": mech.sample_rate,
        "max_grad_norm": tc.max_grad_norm,
        "epsilon_run": lrun.epsilon_run,
        "epsilon_period_after": lrun.epsilon_period_after,
        "delta": lrun.delta,
        "grad_sample_mode": grad_mode,
        "n_train": len(data.train),
        "n_holdout": len(data.holdout),
        "holdout_loss_before": holdout_before,
        "train_loss_first": first_loss,
        "train_loss_last": float(np.mean(recent)) if recent else None,
    }
    if stopped:
        checkpoint()
        ledger.finish(lrun.run_id, status=RunStatus.STOPPED, steps_done=steps_done, note=stop.reason)
        log.info("stopped at step %d of %d (%s); checkpoint saved", steps_done, mech.steps, stop.reason)
        return TrainResult(
            status="stopped",
            reason=stop.reason,
            holdout_loss_after=None,
            seconds=time.monotonic() - started,
            **result_common,
        )

    after = lora_weights(peft_model, targets)
    holdout_after = mean_loss(peft_model, data.holdout)
    trained_names = [t.gguf_name + B_SUFFIX for t in targets]
    if settings.kind is AdapterKind.PERSONAL:
        trained_names += [t.gguf_name + ".lora_a" for t in targets]
    verdict = check_trained(
        {k: init[k] for k in trained_names},
        {k: after[k] for k in trained_names},
        holdout_before=holdout_before,
        holdout_after=holdout_after,
        max_increase=tc.max_holdout_loss_increase,
    )
    result_common["holdout_loss_after"] = holdout_after
    if not verdict.ok:
        ledger.finish(lrun.run_id, status=RunStatus.REFUSED, steps_done=steps_done, note=verdict.reason)
        clear_checkpoint(ckpt_dir)
        result = TrainResult(
            status="refused", reason=verdict.reason, seconds=time.monotonic() - started, **result_common
        )
        _write_result(out_dir, result)
        raise ExportRefused(f"not exporting the {settings.kind.value} adapter: {verdict.reason}")

    if settings.kind is AdapterKind.PERSONAL:
        adapter_path = out_dir / "personal.gguf"
        update_path = None
    else:
        assert rnd is not None
        adapter_path = out_dir / "fleet-local.gguf"
        update_path = out_dir / f"fleet-update-r{rnd.round_id}.ppcf"
    write_lora_gguf(
        adapter_path,
        adapter_file(after, targets, info, alpha=settings.alpha, name=f"ppchat-{settings.kind.value}"),
    )
    if update_path is not None:
        assert rnd is not None and settings.ffa_seed is not None
        b_after = b_matrices(after, targets, info)
        b_before = b_matrices(init, targets, info)
        delta = {k: (b_after[k].astype(np.float64) - b_before[k]).astype(np.float32) for k in b_after}
        write_fleet_delta(
            update_path,
            FleetDeltaHeader(
                round_id=rnd.round_id,
                run_id=lrun.run_id,
                ffa_seed=settings.ffa_seed,
                rank=settings.rank,
                alpha=settings.alpha,
                target_modules=settings.target_modules,
                architecture=info.architecture,
                base_model_sha256=rnd.base_model_sha256,
                init_from=init_b_name or "zeros",
                epsilon=lrun.epsilon_run,
                delta=lrun.delta,
                sample_count=len(data.train),
                steps=steps_done,
                tensors=(),
            ),
            delta,
        )
    ledger.finish(lrun.run_id, status=RunStatus.COMPLETED, steps_done=steps_done)
    clear_checkpoint(ckpt_dir)
    result = TrainResult(
        status="completed",
        adapter_path=str(adapter_path),
        update_path=None if update_path is None else str(update_path),
        seconds=time.monotonic() - started,
        **result_common,
    )
    _write_result(out_dir, result)
    log.info(
        "done: held-out loss %s -> %s, epsilon %.4g, %s",
        holdout_before,
        holdout_after,
        lrun.epsilon_run,
        adapter_path,
    )
    return result


def _write_result(out_dir: Path, result: TrainResult) -> None:
    from fleet.files import write_atomic

    write_atomic(
        out_dir / f"{result.adapter.value}-result.json",
        result.model_dump_json(indent=1).encode() + b"\n",
        mode=0o600,
    )


__all__ = [
    "ExportRefused",
    "FleetRound",
    "LoraTarget",
    "NotEnoughData",
    "StopSignal",
    "TrainRequest",
    "TrainResult",
    "TrainStopped",
    "load_round_spec",
    "lower_priority",
    "train",
]
