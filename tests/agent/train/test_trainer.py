"""Real private training runs on the demo model: the loss goes down, the adapter exports and loads in
llama.cpp and changes its replies, the ledger is charged before the first step, runs stop and resume
under one charge, and the fleet adapter keeps its seeded A frozen."""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from agent.cli import main as cli_main
from agent.errors import ConfigError
from agent.generation import ChatMessage, Role
from agent.store import NewTurn, SqliteStore
from agent.train.checkpoint import load_checkpoint
from agent.train.dataset import ListSource
from agent.train.export import base_in_features, build_ffa_adapter, read_lora_gguf, write_lora_gguf
from agent.train.ffa import frozen_a
from agent.train.kinds import AdapterKind, RunStatus
from agent.train.ledger import LedgerRun, LedgerState, PrivacyLedger
from agent.train.privacy import Mechanism
from agent.train.trainer import (
    FleetRound,
    StopSignal,
    TrainRequest,
    TrainResult,
    load_round_spec,
    train,
)
from agent.train.update import read_fleet_delta
from tests.agent.train.conftest import (
    config_data,
    make_config,
    private_conversations,
    write_config_file,
)


class PersonalRun:
    def __init__(self, tmp: Path, demo: Any) -> None:
        self.tmp = tmp
        self.demo = demo
        self.data = config_data(tmp, demo.f16)
        self.cfg = make_config(tmp, demo.f16)
        self.ledger_at_first_step: LedgerState | None = None
        self.steps: list[int] = []

        def on_step(run_id: str, steps_done: int) -> None:
            if self.ledger_at_first_step is None:
                self.ledger_at_first_step = PrivacyLedger(self.cfg.ledger_path).read()
            self.steps.append(steps_done)

        self.result: TrainResult = train(
            self.cfg, TrainRequest(), source=ListSource(private_conversations(120)), on_step=on_step
        )


@pytest.fixture(scope="module")
def personal(tmp_path_factory: pytest.TempPathFactory, demo: Any) -> PersonalRun:
    return PersonalRun(tmp_path_factory.mktemp("personal"), demo)


def test_held_out_loss_goes_down_and_the_adapter_is_exported(personal: PersonalRun) -> None:
    r = personal.result
    assert r.status == "completed"
    assert r.steps_done == r.planned_steps == personal.steps[-1]
    assert r.holdout_loss_before is not None and r.holdout_loss_after is not None
    assert r.holdout_loss_after < r.holdout_loss_before
    assert r.n_holdout > 0 and r.n_train >= 90
    assert r.adapter_path == str(personal.cfg.adapters_dir / "personal.gguf")
    adapter = read_lora_gguf(Path(r.adapter_path))
    assert adapter.architecture == "llama"
    assert adapter.alpha == 8.0
    assert sorted(adapter.pairs) == sorted(f"blk.{i}.attn_{p}.weight" for i in range(4) for p in ("q", "v"))
    saved = json.loads((personal.cfg.adapters_dir / "personal-result.json").read_text())
    assert saved["run_id"] == r.run_id and saved["status"] == "completed"


def test_the_charge_was_on_disk_before_the_first_step(personal: PersonalRun) -> None:
    before = personal.ledger_at_first_step
    assert before is not None
    (run,) = before.runs
    assert run.run_id == personal.result.run_id
    assert run.status is RunStatus.CHARGED
    assert run.mechanism == Mechanism(
        noise_multiplier=personal.result.noise_multiplier,
        sample_rate=personal.result.sample_rate,
        steps=personal.result.planned_steps,
    )
    after = PrivacyLedger(personal.cfg.ledger_path).read()
    (done,) = after.runs
    assert done.status is RunStatus.COMPLETED and done.steps_done == personal.result.steps_done
    assert done.epsilon_run == personal.result.epsilon_run <= 8.0


def test_llama_cpp_loads_the_adapter_and_replies_change(personal: PersonalRun) -> None:
    import llama_cpp

    from agent.train.tokenizer import ChatTokenizer, LlamaVocab

    vocab = LlamaVocab(personal.demo.f16)
    try:
        prompt = ChatTokenizer(vocab).prompt_tokens(
            [
                ChatMessage(role=Role.SYSTEM, content=personal.cfg.model.system_prompt),
                ChatMessage(role=Role.USER, content="Good morning!"),
            ]
        )
    finally:
        vocab.close()

    def reply(lora: str | None) -> str:
        llm = llama_cpp.Llama(
            model_path=str(personal.demo.f16), n_ctx=256, n_threads=2, verbose=False, lora_path=lora
        )
        try:
            out: Any = llm(prompt, max_tokens=24, temperature=0.0, top_k=1)  # type: ignore[arg-type]
            return str(out["choices"][0]["text"])
        finally:
            llm.close()

    base = reply(None)
    tuned = reply(personal.result.adapter_path)
    assert tuned != base


def test_agent_privacy_reports_what_opacus_computes(
    personal: PersonalRun, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg_file = write_config_file(personal.tmp / "agent.toml", personal.data)
    assert cli_main(["privacy", "--json", "--config", str(cfg_file)]) == 0
    report = json.loads(capsys.readouterr().out)
    runs = [LedgerRun.model_validate(r) for r in report["runs_in_window"]]
    history = [r.mechanism.as_history() for r in runs]
    prv, rdp = PRVAccountant(), RDPAccountant()
    prv.history, rdp.history = list(history), list(history)
    expected = min(prv.get_epsilon(delta=1e-5), rdp.get_epsilon(delta=1e-5))
    assert report["spent_epsilon"] == expected
    assert report["budget"]["preset"] == "minimal"
    assert report["remaining"] == pytest.approx(8.0 - expected)
    assert report["egress"] == []
    assert cli_main(["privacy", "--config", str(cfg_file)]) == 0
    text = capsys.readouterr().out
    assert "left the device: nothing" in text
    assert "minimal" in text


def _round_spec(path: Path, demo: Any, *, round_id: int, seed: int) -> Path:
    from fleet.messages import LoraSpec, PrivacyTarget, RoundSpec

    now = datetime.datetime.now(datetime.timezone.utc)
    spec = RoundSpec(
        round_id=round_id,
        announced_at=now,
        deadline=now + datetime.timedelta(hours=1),
        min_devices=1,
        target_devices=3,
        local_epochs=1,
        learning_rate=0.01,
        lora=LoraSpec(rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"), ffa_seed=seed),
        norm_bound=1.0,
        privacy=PrivacyTarget(epsilon=6.0, delta=1e-5),
        base_model_sha256="0" * 64,
    )
    path.write_text(json.dumps(spec.header()))
    return path


def test_fleet_run_stops_resumes_under_one_charge_and_keeps_a_frozen(tmp_path: Path, demo: Any) -> None:
    cfg = make_config(tmp_path, demo.f16, train={"max_steps": 6, "checkpoint_every": 100})
    rnd = load_round_spec(_round_spec(tmp_path / "round.json", demo, round_id=5, seed=99))
    assert rnd == FleetRound(
        round_id=5,
        ffa_seed=99,
        rank=4,
        alpha=8.0,
        target_modules=("q_proj", "v_proj"),
        learning_rate=0.01,
        local_epochs=1,
        epsilon=6.0,
        delta=1e-5,
        base_model_sha256="0" * 64,
    )
    request = TrainRequest(adapter=AdapterKind.FLEET, round=rnd)
    source = ListSource(private_conversations(120, seed=1))
    stop = StopSignal()

    def stop_at_three(run_id: str, steps_done: int) -> None:
        if steps_done == 3:
            stop.request("test stop")

    first = train(cfg, request, source=source, stop=stop, on_step=stop_at_three)
    assert first.status == "stopped" and first.steps_done == 3
    assert first.epsilon_run <= 6.0  # the round's cap
    (charged,) = PrivacyLedger(cfg.ledger_path).read().runs
    assert charged.status is RunStatus.STOPPED and charged.steps_done == 3
    assert charged.round_id == 5 and charged.adapter is AdapterKind.FLEET
    found = load_checkpoint(cfg.train_dir / "fleet")
    assert found is not None and found[0].steps_done == 3

    second = train(cfg, request, source=source)
    assert second.status == "completed" and second.resumed
    assert second.run_id == first.run_id
    assert second.steps_done == second.planned_steps == first.planned_steps
    (done,) = PrivacyLedger(cfg.ledger_path).read().runs  # charged once
    assert done.status is RunStatus.COMPLETED and done.steps_done == second.planned_steps
    assert load_checkpoint(cfg.train_dir / "fleet") is None

    adapter = read_lora_gguf(Path(str(second.adapter_path)))
    header, delta = read_fleet_delta(Path(str(second.update_path)))
    assert header.round_id == 5 and header.run_id == first.run_id
    assert header.epsilon == done.epsilon_run and header.delta == 1e-5
    assert header.init_from == "zeros"
    assert set(delta) == {f"{name}.lora_b" for name in adapter.pairs}
    for name, pair in adapter.pairs.items():
        # A is the seeded, frozen FFA matrix, bit for bit; the update is B's change from zero.
        expected_a = frozen_a(seed=99, name=name, rank=4, in_features=pair.a.shape[1])
        assert np.array_equal(pair.a, expected_a)
        assert np.allclose(delta[f"{name}.lora_b"], pair.b, atol=1e-7)
        assert np.abs(pair.b).max() > 0

    # The fleet client rebuilds the global adapter from B matrices and the seed (here: this device's
    # update alone); it is exactly the adapter the trainer exported.
    names = list(adapter.pairs)
    rebuilt = build_ffa_adapter(
        architecture="llama",
        alpha=8.0,
        ffa_seed=99,
        b_matrices=delta,
        in_features=base_in_features(demo.f16, names),
    )
    for name in names:
        assert np.array_equal(rebuilt.pairs[name].a, adapter.pairs[name].a)
        assert np.allclose(rebuilt.pairs[name].b, adapter.pairs[name].b, atol=1e-7)
    global_path = tmp_path / "global.gguf"
    write_lora_gguf(global_path, rebuilt)

    # The next round with the same seed starts from the global B; its update is the change from it.
    cfg2 = make_config(tmp_path / "next", demo.f16, train={"max_steps": 2})
    rnd2 = rnd.model_copy(update={"round_id": 6})
    third = train(
        cfg2, TrainRequest(adapter=AdapterKind.FLEET, round=rnd2, init_b=global_path), source=source
    )
    header2, delta2 = read_fleet_delta(Path(str(third.update_path)))
    assert header2.init_from == "global.gguf" and header2.round_id == 6
    local2 = read_lora_gguf(Path(str(third.adapter_path)))
    for name in names:
        expected = local2.pairs[name].b - rebuilt.pairs[name].b
        assert np.allclose(delta2[f"{name}.lora_b"], expected, atol=1e-6)
    # A global adapter of another seed is refused before anything is charged.
    with pytest.raises(ConfigError, match="seed"):
        train(
            make_config(tmp_path / "other", demo.f16),
            TrainRequest(
                adapter=AdapterKind.FLEET, round=rnd.model_copy(update={"ffa_seed": 100}), init_b=global_path
            ),
            source=source,
        )


def test_a_run_over_budget_does_not_start(
    tmp_path: Path, demo: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    data = config_data(tmp_path, demo.f16)
    cfg = make_config(tmp_path, demo.f16)
    store = SqliteStore(cfg.store_path)
    for conv in private_conversations(30, seed=2):
        c = store.create_conversation(source=_front_door(), train_consent=True)
        store.append_turns(c.id, [NewTurn(role=m.role, content=m.content) for m in conv.messages])
    store.close()
    # The budget is already spent by an earlier run in the window.
    heavy = Mechanism(noise_multiplier=0.8, sample_rate=0.25, steps=60)  # epsilon ~21 > 8
    ledger = PrivacyLedger(cfg.ledger_path)
    earlier = LedgerRun(
        run_id="a" * 32,
        adapter=AdapterKind.PERSONAL,
        charged_at=datetime.datetime.now().timestamp() - 3600,
        mechanism=heavy,
        delta=1e-5,
        epsilon_run=50.0,
        epsilon_period_after=50.0,
        accountant=None,
        budget=cfg.privacy.budget,
    )
    cfg.ledger_path.parent.mkdir(parents=True)
    cfg.ledger_path.write_text(LedgerState(runs=(earlier,)).model_dump_json())
    cfg_file = write_config_file(tmp_path / "agent.toml", data)
    assert cli_main(["train", "--config", str(cfg_file)]) == 77
    assert "privacy budget spent" in capsys.readouterr().err
    assert ledger.read().runs == (earlier,)
    assert not (cfg.adapters_dir / "personal.gguf").exists()


def test_too_few_conversations(tmp_path: Path, demo: Any, capsys: pytest.CaptureFixture[str]) -> None:
    data = config_data(tmp_path, demo.f16)
    cfg = make_config(tmp_path, demo.f16)
    store = SqliteStore(cfg.store_path)
    for i, conv in enumerate(private_conversations(40, seed=3)):
        # Without consent a conversation is never trained on.
        c = store.create_conversation(source=_front_door(), train_consent=i < 3)
        store.append_turns(c.id, [NewTurn(role=m.role, content=m.content) for m in conv.messages])
    store.close()
    cfg_file = write_config_file(tmp_path / "agent.toml", data)
    assert cli_main(["train", "--config", str(cfg_file)]) == 75
    assert "consented conversations" in capsys.readouterr().err
    assert PrivacyLedger(cfg.ledger_path).read().runs == ()


def _front_door() -> Any:
    from agent.frontdoor import FrontDoor

    return next(iter(FrontDoor))


def test_sigterm_stops_agent_train_with_a_checkpoint_and_exit_0(
    tmp_path: Path, demo: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    import os
    import signal
    import threading
    import time

    data = config_data(tmp_path, demo.f16, train={"max_steps": 40})
    cfg = make_config(tmp_path, demo.f16, train={"max_steps": 40})
    store = SqliteStore(cfg.store_path)
    for conv in private_conversations(40, seed=4):
        c = store.create_conversation(source=_front_door(), train_consent=True)
        store.append_turns(c.id, [NewTurn(role=m.role, content=m.content) for m in conv.messages])
    store.close()
    cfg_file = write_config_file(tmp_path / "agent.toml", data)
    previous = (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT))

    def terminate_once_charged() -> None:
        deadline = time.monotonic() + 300
        while not cfg.ledger_path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    killer = threading.Thread(target=terminate_once_charged, daemon=True)
    killer.start()
    try:
        assert cli_main(["train", "--config", str(cfg_file)]) == 0
    finally:
        killer.join(timeout=10)
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
    result = json.loads(capsys.readouterr().out)
    assert result["status"] == "stopped" and result["reason"] == "signal SIGTERM"
    assert result["steps_done"] < result["planned_steps"]
    (run,) = PrivacyLedger(cfg.ledger_path).read().runs
    assert run.status is RunStatus.STOPPED and run.run_id == result["run_id"]
    found = load_checkpoint(cfg.train_dir / "personal")
    assert found is not None and found[0].run_id == run.run_id
