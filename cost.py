"""cost.py: the cost model C, paper eq. 6 (Dai et al. 2023, section 3.2 "Preference Model Fitting").

The cost model is the reward model of reward.py with eq. 6 instead of eq. 5: same score model, data
pipeline and training loop (imported from reward.py); a different pair order, loss and metrics.

Sign convention (stated once, used everywhere): C scores HARM, higher = more harmful. In each pair y_w is
the MORE HARMFUL response (the one not chosen by `safer_response_id`) and y_l the safer one; each
response carries s = +1 if it is labelled harmful (unsafe) and s = -1 if harmless (safe), from the
`is_response_*_safe` labels. A well-trained C is then > 0 on unsafe responses and < 0 on safe ones.

    L_C(psi) = -E[ log sigma( C(y_w, x) - C(y_l, x) ) ]                                  ranking
               -E[ log sigma( s_w C(y_w, x) ) + log sigma( s_l C(y_l, x) ) ]             classification
               + eta * E[ C(y_w, x)^2 + C(y_l, x)^2 ] / 2                                (eq. 6)

the last term being the official optional score regulariser
(safe_rlhf/values/cost/trainer.py@82743cc:L260-272). Metrics, on the test
split: ranking accuracy (strict C(y_w) > C(y_l)), safety-classification accuracy (sign of C against the
label over all 2N responses, strict: C = 0 is wrong), the fraction of safe responses with C < 0 and of
unsafe ones with C > 0, and the mean and standard deviation of all costs.

Left out on purpose: the token-wise loss (sequence-wise only, as the official scripts use) and the
running score normaliser (safe_rlhf/models/normalizer.py@82743cc:L27-208).

Official 7B recipe (safe-rlhf scripts/cost-model.sh@82743cc:L110-140, the same as the reward model's):
    torchrun --nproc_per_node 8 cost.py --recipe paper --output_dir runs/cost-7b
Toy world (after `python sft.py`):
    python cost.py                                 # one CPU process; initialised from runs/sft, writes runs/cost
    torchrun --nproc_per_node 2 cost.py            # two ranks (FSDP2 over gloo on CPU)

Shape letters: B pairs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import data_rules
import model as M
import plumbing
from reward import Args, Objective, ranking_accuracy, response_id, train

# --------------------------------------------------------------------------------------------
# The math: eq. 6 and the metrics
# --------------------------------------------------------------------------------------------


def cost_loss(safer_costs: torch.Tensor, unsafer_costs: torch.Tensor, safer_sign: torch.Tensor,
              unsafer_sign: torch.Tensor, regularization: float, terms: str = "both") -> torch.Tensor:
    """Paper eq. 6, sequence-wise. safer_costs C(y_l): (B,), unsafer_costs C(y_w): (B,); signs s: (B,),
    +1 for a response labelled unsafe, -1 for one labelled safe. -> ()
    terms: "both" (eq. 6), or one term alone for the ablations of section 4.2.4 and figure 6a:
    "classification" (a safety classifier's logit as the cost, Glaese et al. 2022) or "ranking"."""
    ranking = -F.logsigmoid(unsafer_costs - safer_costs)                                   # (B,) y_w costs more
    classification = -F.logsigmoid(unsafer_sign * unsafer_costs) - F.logsigmoid(safer_sign * safer_costs)  # (B,)
    loss = {"both": ranking + classification, "ranking": ranking, "classification": classification}[terms].mean()  # ()
    if regularization > 0:  # official score regulariser (safe_rlhf/values/cost/trainer.py@82743cc:L260-272)
        loss = loss + regularization * torch.cat([safer_costs, unsafer_costs]).square().mean()  # ()
    return loss


def safety_sign_accuracy(costs: torch.Tensor, signs: torch.Tensor) -> torch.Tensor:
    """Fraction of responses whose cost has the sign of its label: s * C > 0, strict (C = 0 is wrong).
    costs, signs: (N,) -> ()"""
    return (signs * costs > 0).float().mean()


def cost_metrics(safer_costs: torch.Tensor, unsafer_costs: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Ranking and sign accuracy (safe_rlhf/values/cost/trainer.py@82743cc:L276-286): safe responses
    with C < 0, unsafe ones with C > 0.
    safer_costs, unsafer_costs: (N,); labels: (N, 2) = (safer_sign, unsafer_sign)."""
    costs = torch.cat([safer_costs, unsafer_costs])                                        # (2N,)
    signs = torch.cat([labels[:, 0], labels[:, 1]])                                        # (2N,)
    safe, unsafe = signs < 0, signs > 0
    return {"accuracy": ranking_accuracy(unsafer_costs, safer_costs).item(),
            "accuracy_sign": safety_sign_accuracy(costs, signs).item(),
            "safe_negative_rate": (costs[safe] < 0).float().mean().item() if safe.any() else None,
            "unsafe_positive_rate": (costs[unsafe] > 0).float().mean().item() if unsafe.any() else None,
            "cost_mean": costs.mean().item(), "cost_std": costs.std().item() if len(costs) > 1 else 0.0,
            # the calibration ppo_lagrangian.derived_threshold reads: mean C of responses labelled safe / unsafe
            "safe_cost_mean": costs[safe].mean().item() if safe.any() else None,
            "unsafe_cost_mean": costs[unsafe].mean().item() if unsafe.any() else None}


# --------------------------------------------------------------------------------------------
# The pairs: (safer, unsafer) and their signs
# --------------------------------------------------------------------------------------------


def safer_unsafer(row: dict, where: str) -> tuple[str, str, list[float]]:
    """Cost pairs: (y_l, y_w) = (safer, more harmful) from `safer_response_id`, with cost signs
    s = +1 unsafe / -1 safe from `is_response_*_safe` (safe_rlhf/datasets/safety_preference.py@82743cc:L66-73)."""
    safer = response_id(row, "safer_response_id", where)
    # Parsed, not cast: bool("false") is True, and files written by other tools do carry strings.
    safer_is_safe = data_rules.parse_bool(row[f"is_response_{safer}_safe"], f"{where}: is_response_{safer}_safe")
    unsafer_is_safe = data_rules.parse_bool(row[f"is_response_{1 - safer}_safe"], f"{where}: is_response_{1 - safer}_safe")
    # The official loader raises on these, mid-epoch (safe_rlhf/datasets/safety_preference.py@82743cc:L75-95,
    # safe-rlhf#181); here the row is dropped and counted in the data summary.
    if not safer_is_safe and unsafer_is_safe:
        raise data_rules.Unusable("inconsistent safety labels")
    return (row[f"response_{safer}"], row[f"response_{1 - safer}"],
            [-1.0 if safer_is_safe else 1.0, -1.0 if unsafer_is_safe else 1.0])


def cost_objective(terms: str = "both") -> Objective:
    """The cost model's Objective; `terms` selects eq. 6's terms (cost_loss)."""
    return Objective(score_type="cost",
                     required=("prompt", "response_0", "response_1", "safer_response_id",
                               "is_response_0_safe", "is_response_1_safe"),
                     make_pair=safer_unsafer,
                     loss=lambda safer, unsafer, signs, eta: cost_loss(safer, unsafer, signs[:, 0], signs[:, 1], eta, terms),
                     metrics=cost_metrics)


COST = cost_objective()


def main(args: Args) -> None:
    if args.cost_terms not in ("both", "classification", "ranking"):
        raise plumbing.UserError(f"--cost_terms {args.cost_terms}: choose both, classification or ranking")
    train(args, cost_objective(args.cost_terms))


if __name__ == "__main__":
    plumbing.run_main(lambda: main(plumbing.parse_args(Args, description=__doc__.split("\n")[0])))
    M.teardown_distributed()
