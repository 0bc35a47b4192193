"""
Natural policy gradients on CartPole: ACKTR against Adam and PPO
=================================================================

A policy's Fisher is the curvature of the KL divergence between the policy before and
after a step, so a natural-gradient step of bounded predicted KL is a trust-region step
in the space of policies rather than of weights. :class:`curvlab.ACKTR` takes that step
with K-FAC: the loss is a :class:`curvlab.CategoricalPolicy` (the log-likelihood of the
actions a rollout took, weighted by their advantages), its curvature the sampled Fisher
of the policy, and the step size ``min(lr, sqrt(2δ / ĝᵀg))`` keeps the predicted KL of
each step within ``δ`` (concepts/policy_gradients.md).

CartPole-v1 (gymnasium, the ``rl`` extra; nothing is downloaded): three policy
optimizers on the same rollouts, the same network and the same critic:

* **ACKTR**: one K-FAC trust-region step per batch;
* **Adam PG**: one Adam step on the same policy-gradient loss (advantage actor-critic);
* **PPO**: four epochs of the clipped surrogate on minibatches, with Adam.

The critic is the same for all three (a value network fitted with Adam to the
generalised-advantage returns), so the curves differ only in how the policy moves.
Learning curves: the mean undiscounted return of the episodes that ended in each batch,
over several seeds, against environment steps.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import gymnasium as gym
import matplotlib.pyplot as plt
import numpy as np
import torch
from gymnasium.vector import AutoresetMode, SyncVectorEnv
from torch import nn

import curvlab

# %%
# Rollouts
# --------
# Eight environments stepped together; a batch is ``8 × 64`` transitions. Returns and
# advantages use generalised advantage estimation (``γ = 0.99``, ``λ = 0.95``); an
# episode cut at CartPole's 500-step limit bootstraps from the critic's value of its
# last state instead of counting as a failure.

NUM_ENVS, HORIZON, GAMMA, LAMBDA = 8, 64, 0.99, 0.95


def make_nets(seed: int) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    actor = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh())
    actor.append(nn.Linear(64, 2))
    with torch.no_grad():  # a nearly uniform first policy
        actor[-1].weight.mul_(0.01)
        actor[-1].bias.zero_()
    critic = nn.Sequential(nn.Linear(4, 64), nn.Tanh(), nn.Linear(64, 64), nn.Tanh())
    critic.append(nn.Linear(64, 1))
    return actor, critic


class Rollouts:
    """Collects batches from ``NUM_ENVS`` CartPoles and keeps the finished returns."""

    def __init__(self, seed: int) -> None:
        self.env = SyncVectorEnv(
            [lambda: gym.make("CartPole-v1") for _ in range(NUM_ENVS)],
            autoreset_mode=AutoresetMode.SAME_STEP,
        )
        obs, _ = self.env.reset(seed=seed)
        self.obs = torch.as_tensor(obs, dtype=torch.float32)
        self.running = np.zeros(NUM_ENVS)
        self.finished: list[float] = []

    @torch.no_grad()
    def collect(self, actor: nn.Module, critic: nn.Module, policy: curvlab.PolicyLoss):
        states, actions, rewards, values, nexts, ends, cuts = [], [], [], [], [], [], []
        for _ in range(HORIZON):
            action = policy.sample_actions(actor(self.obs))[:, 0].long()
            obs, reward, terminated, truncated, info = self.env.step(action.numpy())
            obs_t = torch.as_tensor(obs, dtype=torch.float32)
            after = obs_t.clone()  # the state each transition led to (before any reset)
            done = terminated | truncated
            if done.any():
                final = [info["final_obs"][i] if done[i] else obs[i] for i in range(NUM_ENVS)]
                after = torch.as_tensor(np.stack(final), dtype=torch.float32)
            states.append(self.obs)
            actions.append(action)
            rewards.append(torch.as_tensor(reward, dtype=torch.float32))
            values.append(critic(self.obs)[:, 0])
            nexts.append(critic(after)[:, 0])
            ends.append(torch.as_tensor(terminated, dtype=torch.float32))
            cuts.append(torch.as_tensor(done, dtype=torch.float32))
            self.running += reward
            for i in np.flatnonzero(done):
                self.finished.append(float(self.running[i]))
                self.running[i] = 0.0
            self.obs = obs_t
        # GAE backwards through the horizon: δ_t = r_t + γ(1 − term_t) V(s'_t) − V(s_t)
        advantages = torch.zeros(HORIZON, NUM_ENVS)
        running = torch.zeros(NUM_ENVS)
        for t in reversed(range(HORIZON)):
            delta = rewards[t] + GAMMA * (1 - ends[t]) * nexts[t] - values[t]
            running = delta + GAMMA * LAMBDA * (1 - cuts[t]) * running
            advantages[t] = running
        returns = advantages + torch.stack(values)
        return (
            torch.cat(states),
            torch.cat(actions),
            advantages.reshape(-1),
            returns.reshape(-1),
        )


# %%
# The three policy updates
# ------------------------
# Each gets one batch (states, actions, normalised advantages) and moves the actor. The
# policy loss is ``CategoricalPolicy()(logits, policy.pack(actions, advantages))``
# ``= −mean_n A_n log π(a_n | s_n)``; ACKTR's curvature is the Fisher of the same
# policy (sampled actions, K-FAC), whatever the advantages.


def acktr_update(actor: nn.Module, policy: curvlab.PolicyLoss) -> Callable:
    opt = curvlab.ACKTR(
        actor, policy, lr=1.0, max_kl=1e-3, damping=0.01, momentum=0.0, invert_every=1
    )

    def update(states, actions, advantages):
        opt.step(lambda: policy(actor(states), policy.pack(actions, advantages)))

    return update


def adam_update(actor: nn.Module, policy: curvlab.PolicyLoss) -> Callable:
    opt = torch.optim.Adam(actor.parameters(), lr=3e-3)

    def update(states, actions, advantages):
        opt.zero_grad()
        policy(actor(states), policy.pack(actions, advantages)).backward()
        opt.step()

    return update


def ppo_update(actor: nn.Module, policy: curvlab.PolicyLoss) -> Callable:
    opt = torch.optim.Adam(actor.parameters(), lr=1e-3)
    clip, epochs, minibatches = 0.2, 4, 4

    def update(states, actions, advantages):
        targets = policy.pack(actions, advantages)
        with torch.no_grad():
            old = policy.log_prob(actor(states), policy.unpack(targets)[0])
        for _ in range(epochs):
            for idx in torch.randperm(len(states)).chunk(minibatches):
                logp = policy.log_prob(actor(states[idx]), policy.unpack(targets[idx])[0])
                ratio = (logp - old[idx]).exp()
                adv = advantages[idx]
                surrogate = torch.minimum(ratio * adv, ratio.clamp(1 - clip, 1 + clip) * adv)
                opt.zero_grad()
                (-surrogate.mean()).backward()
                opt.step()

    return update


METHODS = {"ACKTR": acktr_update, "Adam PG": adam_update, "PPO": ppo_update}


def train(method: str, seed: int, iterations: int) -> tuple[list[float], float]:
    """The mean return of the episodes finished in each batch, and the seconds taken."""
    actor, critic = make_nets(seed)
    policy = curvlab.CategoricalPolicy()
    update = METHODS[method](actor, policy)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=1e-3)
    rollouts = Rollouts(seed)
    curve: list[float] = []
    started = time.perf_counter()
    for _ in range(iterations):
        states, actions, advantages, returns = rollouts.collect(actor, critic, policy)
        advantages = (advantages - advantages.mean()) / (advantages.std() + 1e-8)
        update(states, actions, advantages)
        for _ in range(4):  # the critic, alike for every method
            critic_opt.zero_grad()
            nn.functional.mse_loss(critic(states)[:, 0], returns).backward()
            critic_opt.step()
        recent = rollouts.finished[-NUM_ENVS:]
        curve.append(float(np.mean(recent)) if recent else float("nan"))
    return curve, time.perf_counter() - started


def main(iterations: int = 100, seeds: tuple[int, ...] = (0, 1, 2, 3, 4), plot: bool = True):
    """Train every method on every seed; return ``{method: [iterations, seeds] array}``."""
    curves: dict[str, np.ndarray] = {}
    for method in METHODS:
        runs, seconds = zip(*(train(method, seed, iterations) for seed in seeds))
        curves[method] = np.array(runs).T
        last = curves[method][-5:].mean(axis=0)
        print(
            f"{method:8s} return over the last 5 batches: {np.nanmean(last):6.1f} "
            f"(seeds {', '.join(f'{v:.0f}' for v in last)}); "
            f"{1e3 * np.mean(seconds) / iterations:.0f} ms per batch"
        )
    if plot:
        steps = np.arange(1, iterations + 1) * NUM_ENVS * HORIZON
        fig, ax = plt.subplots(figsize=(6, 4))
        for method, curve in curves.items():
            mean, std = np.nanmean(curve, axis=1), np.nanstd(curve, axis=1)
            ax.plot(steps, mean, label=method)
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
        ax.set_xlabel("environment steps")
        ax.set_ylabel("episode return (mean ± std over seeds)")
        ax.set_title(f"CartPole-v1, {len(seeds)} seeds")
        ax.legend()
        fig.tight_layout()
    return curves


# %%
# Learning curves
# ---------------
# Five seeds, 100 batches of 512 transitions (51,200 environment steps) per run.

if __name__ == "__main__":
    main()
    plt.show()
