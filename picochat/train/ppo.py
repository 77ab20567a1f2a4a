"""RLHF: PPO (InstructGPT's recipe) and GRPO (DeepSeekMath's), from the SFT model, on its own answers.

PPO: four models. The policy (from the SFT model) answers; a frozen reward model scores each whole
answer; a frozen reference (the SFT model) measures how far the policy has moved, per token; a value
model (from the reward model) predicts each position's return. Rewards are the score at the answer's
last token (minus a fixed penalty for an answer that never ended) and -beta KL_t on every token; GAE
turns them into advantages, whitened; then several epochs of minibatches of the clipped objectives:

    L = E[max(-A rho, -A clip(rho, 1-eps, 1+eps))] + c_v 1/2 E[max((V-R)^2, (V_clip-R)^2)],
    rho = pi(a_t|s_t) / pi_old(a_t|s_t)

beta is fixed, or adapted toward a target KL (--kl-target). GRPO drops the value model: G answers per
prompt, the advantage of answer i is its score minus its group's mean (over the group's std with
--scale-rewards), on every token, and the KL to the reference (k3) is a loss term instead of a reward.
The score is a reward model's (RLHF) or, with ``--reward check``, the task's exact-answer rule (RL from
verifiable rewards): one command for both. Dropout is off in every model.

One optimizer step is one minibatch, so the shared Trainer runs it all: a rollout is made every
ppo_epochs x minibatches steps, from a seed fixed by the iteration, and checkpoints fall between
rollouts, so a killed run resumes exactly. Metrics carry trl's names; a table of sampled answers is
printed every --sample-every iterations (and kept in samples.jsonl); rlhf.png plots reward, KL and
held-out accuracy per iteration.

    picochat rlhf runs/sft --reward runs/reward --prompts addition2 --eval-tasks addition2
    picochat rlhf runs/sft --algo grpo --reward check --prompts addition2 --eval-tasks addition2
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn as nn

from ..cli_args import add_dataclass_args, dataclass_from_args
from ..errors import PicochatError
from .loop import TrainConfig, Trainer
from .rl_data import LoraOptions
from .rl_losses import kl_estimate, masked_mean, ppo_policy_loss, ppo_value_loss


@dataclass
class RLHFConfig(LoraOptions, TrainConfig):
    policy: str = ""
    """The SFT model to improve (a run, checkpoint, smollm2 or .gguf); also the frozen reference."""
    algo: Literal["ppo", "grpo"] = "ppo"
    """ppo (value model, GAE, KL in the reward) or grpo (groups of answers, no value model, KL in the loss)."""
    reward: str = ""
    """A reward-model run (`picochat reward`), or `check` for the task's exact-answer rule (RLVR)."""
    prompts: str = "addition2"
    """Prompts to answer: chat sets NAME[:N] (tasks give checkable answers) or .jsonl files, training split."""
    eval_tasks: str = ""
    """Checkable tasks whose held-out exact-match accuracy is measured at each evaluation."""
    eval_n: int = 200
    """Held-out questions per task for --eval-tasks."""
    out_dir: str = "runs/rlhf"
    """Run directory: checkpoints (the policy, servable as is), metrics.jsonl, samples.jsonl, rlhf.png."""
    max_steps: int = 60
    """PPO iterations: one rollout each, then --ppo-epochs passes over its minibatches."""
    rollout_size: int = 64
    """Answers per rollout (per process). GRPO: prompts x --group-size."""
    group_size: int = 8
    """GRPO: answers sampled per prompt."""
    ppo_epochs: int = 4
    """Passes over each rollout (trl's default 4; the README's experiment uses 1)."""
    minibatch_size: int = 16
    """Answers per optimizer step."""
    max_new_tokens: int = 32
    """Longest answer sampled."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts."""
    kl_coef: float = 0.05
    """beta: weight of the KL penalty to the reference (PPO: per-token reward; GRPO: loss term)."""
    kl_target: Optional[float] = None
    """Adapt beta toward this KL (nats per answer), Ziegler et al.'s controller; default: beta fixed."""
    kl_horizon: int = 10000
    """Horizon of the adaptive KL controller, in answers."""
    missing_eos_penalty: float = 1.0
    """Subtracted from the score of an answer that did not end within --max-new-tokens."""
    gamma: float = 1.0
    """Discount of GAE."""
    lam: float = 0.95
    """lambda of GAE."""
    cliprange: float = 0.2
    """PPO's epsilon for the policy ratio."""
    cliprange_value: float = 0.2
    """Clip range of the value predictions."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    whiten_advantages: bool = True
    """PPO: normalise the advantages over the rollout."""
    scale_rewards: bool = True
    """GRPO: divide the advantages by the group's std (Dr. GRPO leaves it out: --no-scale-rewards)."""
    sample_every: int = 10
    """Print a table of sampled answers and their scores every this many iterations."""
    lr: float = 1e-5
    """Learning rate (constant after warmup)."""
    warmup_steps: int = 0
    """Linear warmup, in optimizer steps."""
    min_lr_frac: float = 1.0
    """Final learning rate as a fraction of the peak (1 = constant)."""
    weight_decay: float = 0.0
    """AdamW weight decay (matrices only)."""
    eval_every: int = 10
    """Measure held-out accuracy every this many iterations (and at the end)."""
    ckpt_every: int = 10
    """Write a checkpoint every this many iterations (and at the end)."""
    log_every: int = 1
    """Write a metrics row every this many iterations."""
    def __post_init__(self):
        super().__post_init__()
        if not self.policy:
            raise PicochatError("name the SFT model to improve: picochat rlhf POLICY --reward RUN|check")
        if not self.reward:
            raise PicochatError("--reward is required: a reward-model run (`picochat reward`) or `check`")
        if self.grad_accum != 1:
            raise PicochatError("--grad-accum is not used by rlhf: --minibatch-size sets the answers per step")
        for name in ("rollout_size", "minibatch_size", "ppo_epochs", "max_new_tokens", "group_size",
                     "sample_every", "kl_horizon"):
            if getattr(self, name) < 1:
                raise PicochatError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.rollout_size % self.minibatch_size:
            raise PicochatError(f"--rollout-size {self.rollout_size} must be a multiple of --minibatch-size "
                                f"{self.minibatch_size}")
        if self.algo == "grpo" and (self.rollout_size % self.group_size or self.group_size < 2):
            raise PicochatError(f"GRPO: --rollout-size {self.rollout_size} must be a multiple of --group-size "
                                f"{self.group_size}, which must be at least 2")
        if not 0 < self.temperature <= 5 or self.kl_coef < 0 or not 0 <= self.lam <= 1 or not 0 < self.gamma <= 1:
            raise PicochatError("--temperature must be in (0, 5], --kl-coef >= 0, --lam in [0, 1], --gamma in (0, 1]")
        if self.kl_target is None and self.kl_horizon != RLHFConfig.kl_horizon:
            raise PicochatError("--kl-horizon paces the adaptive KL controller; give --kl-target too")
        from .rl_data import check_tasks
        check_tasks(self.eval_tasks, self.eval_n)
        if self.kl_target is not None and (self.kl_target <= 0 or self.kl_coef == 0):
            raise PicochatError(f"--kl-target needs a target > 0 (got {self.kl_target}) and a starting --kl-coef > 0 "
                                f"(got {self.kl_coef}): the controller scales beta, it cannot lift it from 0")
        for name in ("cliprange", "cliprange_value", "vf_coef", "missing_eos_penalty"):
            if getattr(self, name) < 0:
                raise PicochatError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if self.compile:
            raise PicochatError("--compile is not supported by rlhf: rollouts run the eager model, and PPO's first "
                                "ratio must compare the same computation")
        if self.batch_size != TrainConfig.batch_size:
            raise PicochatError("--batch-size is not used by rlhf: --rollout-size sets the answers per iteration and "
                                "--minibatch-size the answers per optimizer step")
        # an option the chosen algorithm does not use is refused, not ignored
        unused = (("gamma", "lam", "vf_coef", "cliprange_value", "whiten_advantages") if self.algo == "grpo"
                  else ("group_size", "scale_rewards"))
        changed = [n for n in unused if getattr(self, n) != getattr(RLHFConfig, n)]
        if changed:
            raise PicochatError(f"{', '.join('--' + n.replace('_', '-') for n in changed)} "
                                f"{'is' if len(changed) == 1 else 'are'} not used by --algo {self.algo}")
        self.lora_config()

    @property
    def cycle(self) -> int:
        """Optimizer steps per iteration."""
        return self.ppo_epochs * (self.rollout_size // self.minibatch_size)


class PolicyAndValue(nn.Module):
    """The trained models under one optimizer (as trl's PolicyAndValueWrapper): forward -> (logits, values)."""

    def __init__(self, policy: nn.Module, value: Optional[nn.Module]):
        super().__init__()
        self.policy, self.value = policy, value
        self.config = policy.config

    def forward(self, ids: torch.Tensor):
        logits, _ = self.policy(ids[:, :-1])
        return logits, (self.value(ids)[:, :-1] if self.value is not None else None)


def rl_loss(cfg: RLHFConfig, model, batch, rollout_stats: dict):
    """One minibatch's clipped objectives; stats averaged per iteration under trl's names."""
    ids, mask, old_logp, ref_logp, adv, returns, old_values = batch
    logits, values = model(ids)
    # the distribution the answers were sampled from (as trl), normalised once for log-probs and entropy
    logp_all = torch.log_softmax(logits.float() / cfg.temperature, dim=-1)  # (B, T-1, V)
    logp = torch.gather(logp_all, -1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    pg_loss, pst = ppo_policy_loss(logp, old_logp, adv, mask, cfg.cliprange)
    with torch.no_grad():
        ent = -(logp_all.exp() * logp_all).sum(-1)
    stats = {"loss/policy_avg": pg_loss.item(), "policy/clipfrac_avg": pst["policy/clipfrac"],
             "policy/approxkl_avg": pst["policy/approxkl"], "val/ratio": pst["val/ratio"],
             "policy/entropy_avg": masked_mean(ent, mask).item()}
    loss = pg_loss
    if values is not None:
        vf_loss, vst = ppo_value_loss(values.float(), old_values, returns, mask, cfg.cliprange_value)
        loss = loss + cfg.vf_coef * vf_loss
        stats |= {"loss/value_avg": vf_loss.item(), "val/clipfrac_avg": vst["value/clipfrac"]}
    else:  # GRPO: the KL to the reference is part of the loss (k3: unbiased and >= 0)
        kl = masked_mean(kl_estimate(logp, ref_logp, "k3"), mask)
        loss = loss + cfg.kl_coef * kl
        stats["loss/kl_avg"] = kl.item()
    return loss, stats | {k: float(v) for k, v in rollout_stats.items()}


def _value_state(value, lora) -> dict:
    """What a checkpoint keeps of the value model: everything (a tied LM head once), or with LoRA the
    adapters and the head."""
    tied = value.config.tie_embeddings
    return {k: v.detach().cpu().contiguous() for k, v in value.state_dict().items()
            if (lora is None and not (tied and k == "body.lm_head.weight"))
            or (lora is not None and (k.startswith("score.") or ".lora_" in k))}


def rl_checkpoints(model: PolicyAndValue, tokenizer, lora, base: str, state: dict) -> dict:
    """The Trainer's hooks: the policy as a servable checkpoint (or LoRA adapter) plus value.safetensors
    and rl_state.json (the KL coefficient, which the adaptive controller changes)."""
    from safetensors.torch import save_file
    from ..checkpoints.io import load_state
    from ..model.lora import load_trained, save_trained

    def save_weights(out_dir: Path, extra_files: dict) -> None:
        files = dict(extra_files)
        files["rl_state.json"] = json.dumps({"kl_coef": state["kl_coef"]} | state["shape"]).encode()
        if model.value is not None:
            vs = _value_state(model.value, lora)
            files["value.safetensors"] = lambda p: save_file(vs, str(p))
        save_trained(model.policy, lora, out_dir, base=base, tokenizer=tokenizer, extra_files=files)

    def load_weights(ckpt: Path) -> None:
        load_trained(model.policy, lora, ckpt)
        if model.value is not None:
            vs = load_state(ckpt / "value.safetensors")
            want = _value_state(model.value, lora)
            if set(vs) != set(want):
                raise PicochatError(f"cannot resume: {ckpt}/value.safetensors holds another value model "
                                    f"({len(set(vs) ^ set(want))} tensors differ); use a new --out-dir")
            model.value.load_state_dict(vs, strict=False)
            if lora is None and model.value.config.tie_embeddings:
                model.value.body.lm_head.weight = model.value.body.tok_emb.weight
        saved = json.loads((ckpt / "rl_state.json").read_text())
        changed = [f"--{k.replace('_', '-')} {saved.get(k)!r} (now {v!r})" for k, v in state["shape"].items()
                   if saved.get(k) != v]
        if changed:  # a step would fall elsewhere in an iteration, or beta would silently be the old one
            raise PicochatError(f"cannot resume: {ckpt} was trained with {', '.join(changed)}; repeat its options "
                                f"or use a new --out-dir")
        state["kl_coef"] = saved["kl_coef"]
    return {"save_weights": save_weights, "load_weights": load_weights}


def rlhf(cfg: RLHFConfig) -> list[dict]:
    """PPO or GRPO on cfg.policy; returns the metric rows. The plain-Python form of `picochat rlhf`."""
    from ..chat_template import pick_template
    from ..checkpoints.io import load_model
    from ..model.scalar import ScalarModel, load_scalar_model
    from .dpo import task_accuracy
    from .rl_data import freeze, no_dropout, same_tokenizer
    from .rl_report import plot_rl, sample_table
    from .rollout import Checker, RewardModelScorer, adaptive_kl, make_rollout, rl_prompts
    items = rl_prompts(cfg.prompts, cfg.seed)
    policy, tokenizer, _ = load_model(cfg.policy)
    if tokenizer is None:
        raise PicochatError(f"{cfg.policy} has no tokenizer.json; RL needs the tokenizer the model was trained with")
    template = pick_template(tokenizer)
    ref = load_model(cfg.policy)[0]
    rm, value = None, None
    if cfg.reward == "check":
        scorer = Checker()
        if any(it["task"] is None for it in items):
            raise PicochatError("--reward check needs prompts from checkable tasks (e.g. --prompts addition2); "
                                "use a reward model for other prompts")
    else:
        rm, rm_tok, _ = load_scalar_model(cfg.reward)
        same_tokenizer(rm_tok, tokenizer, f"the reward model {cfg.reward}", f"the policy {cfg.policy}")
        scorer = RewardModelScorer(rm)
    if cfg.algo == "ppo":  # the value model starts as the reward model (InstructGPT), or the policy + a new head
        torch.manual_seed(cfg.seed)
        value = load_scalar_model(cfg.reward)[0] if rm is not None else ScalarModel(load_model(cfg.policy)[0])
    for m in (policy, ref, rm, value):
        if m is not None:
            no_dropout(m)
    freeze(ref)
    if rm is not None:
        freeze(rm)
    lora = cfg.lora_config()
    if lora is not None:
        from ..model.lora import add_lora
        torch.manual_seed(cfg.seed)
        add_lora(policy, lora)
        if value is not None:
            add_lora(value.body, lora)
            value.freeze_unused()
    model = PolicyAndValue(policy, value)
    from ..data.chat_tasks import TASKS
    checkable = all(it["task"] is not None and TASKS[it["task"]].checkable for it in items)  # same on every rank
    cycle, n_mb = cfg.cycle, cfg.rollout_size // cfg.minibatch_size
    tcfg = dataclasses.replace(cfg, max_steps=cfg.max_steps * cycle, eval_every=cfg.eval_every * cycle,
                               ckpt_every=cfg.ckpt_every * cycle, log_every=cfg.log_every * cycle)
    state: dict = {"rollout": None, "iter": -1, "kl_coef": cfg.kl_coef,
                   "shape": {"algo": cfg.algo, "rollout_size": cfg.rollout_size, "minibatch_size": cfg.minibatch_size,
                             "ppo_epochs": cfg.ppo_epochs, "group_size": cfg.group_size, "kl_coef_start": cfg.kl_coef,
                             "kl_target": cfg.kl_target}}
    box: list[Trainer] = []
    out = Path(cfg.out_dir)
    per_rollout = cfg.rollout_size // (cfg.group_size if cfg.algo == "grpo" else 1)

    perms: dict[int, torch.Tensor] = {}

    def pick(it: int, rank: int, world: int) -> list[dict]:
        """The prompts of iteration it on this rank: a pure function of (it, rank), so resuming repeats them."""
        chosen = []
        for j in range(per_rollout):
            epoch, i = divmod((it * world + rank) * per_rollout + j, len(items))
            if epoch not in perms:
                g = torch.Generator().manual_seed(cfg.seed * 7919 + epoch)
                perms[epoch] = torch.randperm(len(items), generator=g)
            chosen.append(items[int(perms[epoch][i])])
        return [x for x in chosen for _ in range(cfg.group_size if cfg.algo == "grpo" else 1)]

    def batch_fn(step: int, micro: int):
        tr = box[0]
        it, k = divmod(step, cycle)
        if state["iter"] != it:
            ro = make_rollout(cfg, policy, ref, value, scorer, pick(it, tr.dist.rank, tr.dist.world), tokenizer,
                              template, cfg.seed * 1_000_003 + it * tr.dist.world + tr.dist.rank, tr.autocast,
                              state["kl_coef"], checkable)
            ro.stats["iteration"] = it + 1
            state.update(rollout=ro, iter=it)
            from .dist import all_reduce_mean
            kl = float(all_reduce_mean(torch.tensor(ro.stats["objective/kl"], device=tr.device), tr.dist))
            state["kl_coef"] = adaptive_kl(state["kl_coef"], kl, cfg.kl_target, cfg.kl_horizon,
                                           cfg.rollout_size * tr.dist.world)  # the same beta on every rank
            if tr.dist.is_main:
                if it % cfg.sample_every == 0 or it + 1 == cfg.max_steps:
                    sample_table(out, it + 1, ro.samples, ro.stats)
                plot_rl(out)
        ro = state["rollout"]
        epoch, mb = divmod(k, n_mb)
        rows = ro.order[epoch][mb * cfg.minibatch_size:(mb + 1) * cfg.minibatch_size]
        return (ro.ids[rows], ro.mask[rows], ro.old_logp[rows], ro.ref_logp[rows], ro.advantages[rows],
                ro.returns[rows], ro.values[rows])

    def eval_fn(m):
        return task_accuracy(m.policy, tokenizer, template, cfg.eval_tasks, cfg.eval_n)
    trainer = Trainer(tcfg, model, batch_fn, lambda m, b: rl_loss(cfg, m, b, state["rollout"].stats),
                      eval_fn=eval_fn if cfg.eval_tasks else None, tokenizer=tokenizer,
                      run_info={"stage": "rlhf", "algo": cfg.algo, "policy": cfg.policy, "reward": cfg.reward,
                                "prompts": cfg.prompts, "optimizer_steps_per_iteration": cycle,
                                "lora": asdict(lora) if lora else None},
                      **rl_checkpoints(model, tokenizer, lora, cfg.policy, state))
    box.append(trainer)
    for m in (ref, rm):
        if m is not None:
            m.to(trainer.device)
    if trainer.dist.is_main:
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        print(f"rlhf: {cfg.algo.upper()} on {cfg.policy} ({policy.num_params() / 1e6:.1f}M parameters; "
              f"{trained / 1e6:.2f}M trained{f', LoRA r={cfg.lora_rank}' if lora else ''}), reward "
              f"{'the exact-answer check' if rm is None else cfg.reward}; {len(items):,} prompts, {cfg.max_steps} "
              f"iterations of {cfg.rollout_size} answers, {cycle} optimizer steps each")
    base_file = out / "baseline.json"
    if cfg.eval_tasks and not (cfg.resume and base_file.is_file()):  # every rank, as the Trainer's evals
        from ..fsutil import atomic_write
        policy.eval()
        with torch.no_grad(), trainer.autocast():
            base = eval_fn(model)
        policy.train()
        if trainer.dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            atomic_write(base_file, json.dumps(base) + "\n")
            print("before RL: " + ", ".join(f"{k} {v:.1%}" for k, v in base.items()))
    rows = trainer.fit()
    if trainer.dist.is_main:
        plot_rl(out)
        evals = [r for r in rows if any(k.startswith("eval/") for k in r)]
        if evals:
            print("after RL: " + ", ".join(f"{k} {v:.1%}" for k, v in evals[-1].items() if k.startswith("eval/")))
        print(f"done: {cfg.max_steps} iterations; plots in {out / 'rlhf.png'}; chat with it: picochat chat {out}")
    return rows


def add_parser(sub) -> None:
    p = sub.add_parser("rlhf", help="reinforcement learning on the model's own answers: PPO or GRPO",
                       description=__doc__.split("\n\n")[0], epilog=__doc__.split("\n\n")[-1],
                       formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    add_dataclass_args(p, RLHFConfig, positional=("policy",))
    p.set_defaults(func=lambda args: rlhf(dataclass_from_args(RLHFConfig, args)) and 0)
