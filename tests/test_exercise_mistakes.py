"""Every graded exercise's check rejects plausible wrong answers (issue 20).

For each check, at least two typical mistakes — a missing square root, a swapped sign, a forgotten factor, a
forgotten noise term, an off-by-one — are fed to the check in place of the solution, and the check must answer
"not quite" (``ExerciseWrong``), where a check recognises the mistake, with the hint that names it.

Each notebook is executed once, in fast mode, up to its last check: at every check cell, each mistake is
defined in place of the solution and the check is run on it; then the solution is restored, the check is run
on it (it must pass), and execution goes on.
"""

from __future__ import annotations

import re
from collections import defaultdict

import pytest

from minidiff.classroom import ExerciseWrong
from tests.notebook_tools import ROOT, cell_source, load, nbgrader, only_displays

NOTEBOOKS_DIR = ROOT / "notebooks"
#: check grade_id -> [(a wrong solution cell, a regex its rejection must match, or None for "rejected at all")]
MISTAKES: dict[str, list[tuple[str, str | None]]] = {
    # 01
    "ex01_forward_step_check": [
        ("def forward_step(x_prev, beta_t, noise):\n    return (1 - beta_t) * x_prev + beta_t * noise\n",
         "square roots"),
        ("def forward_step(x_prev, beta_t, noise):\n    return beta_t ** 0.5 * x_prev + (1 - beta_t) ** 0.5 * noise\n",
         "swapped")],
    "ex01_closed_form_check": [
        ("def closed_form_sample(x0, a, noise):\n    return a * x0 + (1 - a) * noise\n", "square root"),
        ("def closed_form_sample(x0, a, noise):\n    return a ** 0.5 * x0 + (1 - a ** 0.5) * noise\n",
         r"not 1 - sqrt")],
    "ex01_snr_crossing_check": [
        ("def first_step_below(schedule, level):\n    return int((schedule.snr[1:] < level).nonzero()[0].item())\n",
         "not below 1"),
        ("def first_step_below(schedule, level):\n    return (schedule.snr[1:] < level).nonzero()[0] + 1\n",
         "Python int")],
    "ex01_find_the_bug_check": [
        ("def fixed_chain(x0, betas, generator):\n    x = x0\n    for beta in betas[1:].tolist():\n"
         "        x = (1 - beta) * x + beta ** 0.5 * torch.randn(x.shape, generator=generator, dtype=x.dtype)\n"
         "    return x\n", "the mean is"),
        ("def fixed_chain(x0, betas, generator):\n    x = x0\n    for beta in betas[1:].tolist():\n"
         "        x = (1 - beta) ** 0.5 * x + beta * torch.randn(x.shape, generator=generator, dtype=x.dtype)\n"
         "    return x\n", "Too small")],
    # 02
    "ex02_posterior_check": [
        ("def my_posterior(schedule, x0, x_t, t):\n"
         "    alpha, alpha_bar = schedule.alphas[t], schedule.alpha_bars[t]\n"
         "    alpha_bar_prev, beta = schedule.alpha_bars[t - 1], schedule.betas[t]\n"
         "    mean = (alpha.sqrt() * (1 - alpha_bar_prev) * x0 + alpha_bar_prev.sqrt() * beta * x_t) / (1 - alpha_bar)\n"
         "    return mean, (1 - alpha_bar_prev) / (1 - alpha_bar) * beta\n", "which coefficient multiplies x0"),
        ("def my_posterior(schedule, x0, x_t, t):\n"
         "    alpha, alpha_bar = schedule.alphas[t], schedule.alpha_bars[t]\n"
         "    alpha_bar_prev, beta = schedule.alpha_bars[t - 1], schedule.betas[t]\n"
         "    mean = (alpha_bar_prev.sqrt() * beta * x0 + alpha.sqrt() * (1 - alpha_bar_prev) * x_t) / (1 - alpha_bar)\n"
         "    return mean, beta\n", "the variance")],
    "ex02_find_the_bug_check": [
        ("def fixed_posterior_variance(schedule, t):\n"
         "    return float((1 - schedule.alpha_bars[t]) / (1 - schedule.alpha_bars[t - 1]) * schedule.betas[t])\n",
         "upside down"),
        ("def fixed_posterior_variance(schedule, t):\n    return float(schedule.betas[t])\n", "forward step's variance")],
    "ex02_gaussian_kl_check": [
        ("def my_gaussian_kl(m1, v1, m2, v2):\n    return torch.log(v2 / v1) + (v1 + (m1 - m2) ** 2) / v2 - 1\n",
         "factor 1/2"),
        ("def my_gaussian_kl(m1, v1, m2, v2):\n    return 0.5 * (torch.log(v1 / v2) + (v1 + (m1 - m2) ** 2) / v2 - 1)\n",
         "upside down")],
    "ex02_lambda_check": [
        ("def my_lambdas(schedule):\n    t = torch.arange(2, schedule.T + 1)\n"
         "    return schedule.betas[t] ** 2 / (schedule.posterior_variances[t] * schedule.alphas[t]"
         " * (1 - schedule.alpha_bars[t]))\n", "lambda_t ="),
        ("def my_lambdas(schedule):\n    t = torch.arange(2, schedule.T + 1)\n"
         "    return schedule.betas[t] ** 2 / (2 * schedule.betas[t] * schedule.alphas[t]"
         " * (1 - schedule.alpha_bars[t]))\n", "lambda_t =")],
    # 03
    "ex03_loss_check": [
        ("def my_ddpm_loss(model, schedule, x0, t, noise):\n    x_t = x0 + noise\n"
         "    return ((noise - model(x_t, t)) ** 2).mean()\n", "closed form"),
        ("def my_ddpm_loss(model, schedule, x0, t, noise):\n    a = schedule.alpha_bars[t].float()[:, None]\n"
         "    x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise\n    return ((noise - model(x_t, t)) ** 2).sum()\n",
         "closed form")],
    "ex03_reverse_step_check": [
        ("def my_reverse_step(x_t, eps_pred, t, schedule, z):\n"
         "    beta, alpha, a = schedule.betas[t].item(), schedule.alphas[t].item(), schedule.alpha_bars[t].item()\n"
         "    return (x_t - beta / (1 - a) ** 0.5 * eps_pred) / alpha ** 0.5 + beta ** 0.5 * z\n",
         "No noise at the last step"),
        ("def my_reverse_step(x_t, eps_pred, t, schedule, z):\n"
         "    beta, alpha, a = schedule.betas[t].item(), schedule.alphas[t].item(), schedule.alpha_bars[t].item()\n"
         "    mean = (x_t - beta / (1 - a) ** 0.5 * eps_pred) / alpha ** 0.5\n"
         "    return mean + beta * z if t > 1 else mean\n", "my_reverse_step")],
    "ex03_find_the_bug_check": [
        ("def fixed_slide_step(x_t, eps_pred, t, schedule, z):\n"
         "    beta, alpha, a = schedule.betas[t].item(), schedule.alphas[t].item(), schedule.alpha_bars[t].item()\n"
         "    mean = (x_t - beta / (1 - a) ** 0.5 * eps_pred) / alpha ** 0.5\n"
         "    return mean + schedule.posterior_variances[t].item() * z if t > 1 else mean\n", "barely spread"),
        ("def fixed_slide_step(x_t, eps_pred, t, schedule, z):\n"
         "    beta, alpha, a = schedule.betas[t].item(), schedule.alphas[t].item(), schedule.alpha_bars[t].item()\n"
         "    mean = x_t - beta / (1 - a) ** 0.5 * eps_pred\n"
         "    return mean + schedule.posterior_variances[t].item() ** 0.5 * z if t > 1 else mean\n", "samples have")],
    # 04
    "ex04_dsm_check": [
        ("def my_dsm_loss(score_model, x, sigma, z):\n"
         "    return 0.5 * ((score_model(x + sigma * z) - z / sigma) ** 2).sum(-1).mean()\n", "target is -z / sigma"),
        ("def my_dsm_loss(score_model, x, sigma, z):\n"
         "    return ((score_model(x + sigma * z) + z / sigma) ** 2).sum(-1).mean()\n", "my_dsm_loss")],
    "ex04_find_the_bug_check": [
        ("def fixed_gaussian_score(x, mean, var):\n    return (x - mean) / var\n", "points away from the mean"),
        ("def fixed_gaussian_score(x, mean, var):\n    return -(x - mean) / var ** 0.5\n", "not the standard deviation")],
    "ex04_langevin_check": [
        ("def my_langevin_step(x, score, step_size, z):\n    return x + step_size * score + step_size ** 0.5 * z\n",
         "Which variance"),
        ("def my_langevin_step(x, score, step_size, z):\n"
         "    return x + 0.5 * step_size * score + (2 * step_size) ** 0.5 * z\n", "my_langevin_step")],
    # 05
    "ex05_pf_drift_check": [
        ("def my_pf_drift(sde, score_fn, x, s):\n"
         "    return sde.drift(x, s) - sde.diffusion_coefficient(s) ** 2 * score_fn(x, s)\n", r"Half of g\^2"),
        ("def my_pf_drift(sde, score_fn, x, s):\n"
         "    return sde.drift(x, s) + 0.5 * sde.diffusion_coefficient(s) ** 2 * score_fn(x, s)\n", r"Half of g\^2")],
    "ex05_find_the_bug_check": [
        ("def fixed_reverse_step(sde, score_fn, x, s, ds, z):\n    g = sde.diffusion_coefficient(s)\n"
         "    return x - (sde.drift(x, s) - g ** 2 * score_fn(x, s)) * ds + g * ds * z\n", "barely spread"),
        ("def fixed_reverse_step(sde, score_fn, x, s, ds, z):\n    g = sde.diffusion_coefficient(s)\n"
         "    return x - (sde.drift(x, s) - 0.5 * g ** 2 * score_fn(x, s)) * ds + g * ds ** 0.5 * z\n",
         "Compare the drift")],
    "ex05_heun_check": [
        ("def my_heun_step(drift, x, s, s_next):\n    slope = drift(x, s)\n"
         "    return x + 0.5 * (s_next - s) * (slope + drift(x, s_next))\n", "Euler guess"),
        ("def my_heun_step(drift, x, s, s_next):\n    slope = drift(x, s)\n    guess = x + (s_next - s) * slope\n"
         "    return x + (s_next - s) * (slope + drift(guess, s_next))\n", "my_heun_step")],
    # 06
    "ex06_embedding_check": [
        ("def my_sinusoidal_embedding(t, dim):\n    half = dim // 2\n"
         "    angles = t.float()[:, None] * 10_000.0 ** (-torch.arange(half) / half)[None]\n"
         "    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)\n", "the embedding"),
        ("def my_sinusoidal_embedding(t, dim):\n    half = dim // 2\n"
         "    angles = t.float()[:, None] * 1_000.0 ** (-torch.arange(half) / half)[None]\n"
         "    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)\n", "the embedding")],
    "ex06_find_the_bug_check": [
        ("def fixed_embedding(t, dim):\n    half = dim // 2\n"
         "    angles = t.double()[:, None] * (10_000.0 ** (-torch.arange(half) / half))[None]\n"
         "    return torch.cat([torch.sin(angles), torch.sin(angles)], dim=1)\n", "a sine and a cosine"),
        ("def fixed_embedding(t, dim):\n    half = dim // 2\n"
         "    angles = t.double()[:, None] * (10_000.0 ** (torch.arange(half) / half))[None]\n"
         "    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)\n", "must fall")],
    "ex06_attention_check": [
        ("def my_attention(module, x):\n    b, c, h, w = x.shape\n"
         "    tokens = module.norm(x).flatten(2).transpose(1, 2)\n    keys, values = module.key_value(tokens).chunk(2, -1)\n"
         "    weights = torch.softmax(module.query(tokens) @ keys.transpose(1, 2), dim=-1)\n"
         "    return x + module.out(weights @ values).transpose(1, 2).reshape(b, c, h, w)\n", "attention output"),
        ("def my_attention(module, x):\n    b, c, h, w = x.shape\n"
         "    tokens = module.norm(x).flatten(2).transpose(1, 2)\n    keys, values = module.key_value(tokens).chunk(2, -1)\n"
         "    weights = torch.softmax(module.query(tokens) @ keys.transpose(1, 2) / c ** 0.5, dim=-1)\n"
         "    return module.out(weights @ values).transpose(1, 2).reshape(b, c, h, w)\n", "attention output")],
    "ex06_receptive_check": [
        ("def my_receptive_field(layers):\n    field, jump = 1, 1\n    for kernel, stride in layers:\n"
         "        field += (kernel - 1) * jump\n    return field\n", "product of the strides"),
        ("def my_receptive_field(layers):\n    field, jump = 1, 1\n    for kernel, stride in layers:\n"
         "        jump *= stride\n        field += (kernel - 1) * jump\n    return field\n", "own stride")],
    # 07
    "ex07_ema_check": [
        ("def my_ema_update(averaged, current, decay):\n    for average, weight in zip(averaged, current):\n"
         "        average.mul_(1 - decay).add_(weight, alpha=decay)\n", "averaged weights"),
        ("def my_ema_update(averaged, current, decay):\n    for average, weight in zip(averaged, current):\n"
         "        average = decay * average + (1 - decay) * weight\n", "averaged weights")],
    "ex07_find_the_bug_check": [
        ("def fixed_timesteps(batch_size, T, generator):\n"
         "    return torch.randint(0, T, (batch_size,), generator=generator)\n", "clean data"),
        ("def fixed_timesteps(batch_size, T, generator):\n"
         "    return torch.randint(1, T, (batch_size,), generator=generator)\n", "never comes up")],
    "ex07_x0_check": [
        ("def my_predict_x0(schedule, x_t, t, eps):\n    a = schedule.alpha_bars[t].item()\n"
         "    return (x_t - (1 - a) ** 0.5 * eps) / a\n", "x̂0"),
        ("def my_predict_x0(schedule, x_t, t, eps):\n    a = schedule.alpha_bars[t].item()\n"
         "    return (x_t + (1 - a) ** 0.5 * eps) / a ** 0.5\n", "x̂0")],
    # 08
    "ex08_ddim_step_check": [
        ("def my_ddim_step(x_t, eps, a_t, a_s, eta, z):\n    x0 = (x_t - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5\n"
         "    sigma = eta * ((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)) ** 0.5\n"
         "    return a_s ** 0.5 * x0 + (1 - a_s) ** 0.5 * eps + sigma * z\n", "variance of x_s"),
        ("def my_ddim_step(x_t, eps, a_t, a_s, eta, z):\n    x0 = (x_t - (1 - a_s) ** 0.5 * eps) / a_s ** 0.5\n"
         "    sigma = eta * ((1 - a_s) / (1 - a_t) * (1 - a_t / a_s)) ** 0.5\n"
         "    return a_s ** 0.5 * x0 + (1 - a_s - sigma ** 2) ** 0.5 * eps + sigma * z\n", "two DDIM steps")],
    "ex08_euler_check": [
        ("def my_euler_step(x_t, eps, a_t, a_s):\n"
         "    return (x_t / a_t ** 0.5 + ((1 - a_s) / a_s - (1 - a_t) / a_t) * eps) * a_s ** 0.5\n", "Euler step"),
        ("def my_euler_step(x_t, eps, a_t, a_s):\n"
         "    return x_t / a_t ** 0.5 + (((1 - a_s) / a_s) ** 0.5 - ((1 - a_t) / a_t) ** 0.5) * eps\n", "Euler step")],
    "ex08_find_the_bug_check": [
        ("def fixed_ddim(eps_model, schedule, x_T, steps):\n    visited = [*timestep_sequence(schedule.T, steps), 0]\n"
         "    x = x_T\n    for t, s in itertools.pairwise(visited):\n"
         "        a_t, a_s = schedule.alpha_bars[t].item(), schedule.alpha_bars[s].item()\n"
         "        eps = eps_model(x, torch.full((len(x),), t))\n        x0 = (x - (1 - a_s) ** 0.5 * eps) / a_s ** 0.5\n"
         "        x = a_s ** 0.5 * x0 + (1 - a_s) ** 0.5 * eps\n    return x\n", "Which noise level"),
        ("def fixed_ddim(eps_model, schedule, x_T, steps):\n    visited = [*timestep_sequence(schedule.T, steps), 0]\n"
         "    x = x_T\n    for t, s in itertools.pairwise(visited):\n"
         "        a_t, a_s = schedule.alpha_bars[t].item(), schedule.alpha_bars[s].item()\n"
         "        eps = eps_model(x, torch.full((len(x),), t))\n        x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5\n"
         "        x = a_s ** 0.5 * x0 + (1 - a_s) * eps\n    return x\n", "Which noise level")],
    # 09
    "ex09_cfg_check": [
        ("def my_cfg(u, c, scale):\n    return c + scale * (c - u)\n", "one step beyond"),
        ("def my_cfg(u, c, scale):\n    return u + scale * (u - c)\n", "scale-1 samples")],
    "ex09_find_the_bug_check": [
        ("def fixed_gradient(classifier, x, t, label):\n    with torch.enable_grad():\n"
         "        probe = x.detach().requires_grad_(True)\n"
         "        p = torch.softmax(classifier(probe, t), dim=-1)[:, label].sum()\n"
         "        return torch.autograd.grad(p, probe)[0]\n", "gradient of LOG p"),
        ("def fixed_gradient(classifier, x, t, label):\n    with torch.enable_grad():\n"
         "        probe = x.detach().requires_grad_(True)\n"
         "        log_p = torch.log_softmax(classifier(probe, t), dim=-1)[:, label].sum()\n"
         "        return -torch.autograd.grad(log_p, probe)[0]\n", "your gradient")],
    "ex09_cg_check": [
        ("def my_classifier_guided_eps(eps, grad, alpha_bar, scale):\n    return eps + scale * (1 - alpha_bar) ** 0.5 * grad\n",
         "classifier guidance"),
        ("def my_classifier_guided_eps(eps, grad, alpha_bar, scale):\n    return eps - scale * (1 - alpha_bar) * grad\n",
         "classifier guidance")],
    # 10
    "ex10_attention_check": [
        ("def my_attention(query, key, value, mask):\n    scores = query @ key.transpose(-1, -2)\n"
         "    return scores.masked_fill(~mask, float('-inf')).softmax(dim=-1) @ value\n", "1/sqrt"),
        ("def my_attention(query, key, value, mask):\n    scores = query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5\n"
         "    return scores.softmax(dim=-1) @ value\n", "-inf")],
    "ex10_cross_attention_check": [
        ("def my_cross_attention(layer, x, context, mask):\n    b, c, h, w = x.shape\n"
         "    pixels = layer.norm(x).flatten(2).transpose(1, 2)\n    keys, values = layer.key_value(context).chunk(2, -1)\n"
         "    heads = lambda z: z.unflatten(-1, (layer.heads, -1)).transpose(1, 2)\n"
         "    out = torch.nn.functional.scaled_dot_product_attention(heads(layer.query(pixels)), heads(keys), "
         "heads(values), attn_mask=mask[:, None, None, :])\n"
         "    return layer.out(out.transpose(1, 2).flatten(2)).transpose(1, 2).reshape(b, c, h, w)\n", "residual"),
        ("def my_cross_attention(layer, x, context, mask):\n    b, c, h, w = x.shape\n"
         "    pixels = layer.norm(x).flatten(2).transpose(1, 2)\n    keys, values = layer.key_value(context).chunk(2, -1)\n"
         "    heads = lambda z: z.unflatten(-1, (layer.heads, -1)).transpose(1, 2)\n"
         "    out = torch.nn.functional.scaled_dot_product_attention(heads(layer.query(pixels)), heads(keys), "
         "heads(values))\n"
         "    return x + layer.out(out.transpose(1, 2).flatten(2)).transpose(1, 2).reshape(b, c, h, w)\n",
         "my_cross_attention")],
    "ex10_find_the_bug_check": [
        ("def fixed_mask(tokens):\n    return tokens == WORD_IDS['<pad>']\n", "hides the caption|look at <pad>"),
        ("def fixed_mask(tokens):\n    return torch.ones_like(tokens, dtype=torch.bool)\n", "look at <pad>")],
    "ex10_caption_dropout_check": [
        ("def my_caption_dropout(tokens, p, null_id, generator):\n"
         "    dropped = torch.rand(tokens.shape, generator=generator) < p\n"
         "    return torch.where(dropped, torch.full_like(tokens, null_id), tokens)\n", "whole"),
        ("def my_caption_dropout(tokens, p, null_id, generator):\n"
         "    dropped = torch.rand(tokens.shape[0], generator=generator) > p\n"
         "    return torch.where(dropped[:, None], torch.full_like(tokens, null_id), tokens)\n", "you dropped")],
    # 11
    "ex11_kl_check": [
        ("def my_kl(mean, log_var):\n    return 0.5 * (mean ** 2 + log_var.exp() - log_var)\n", "forget the -1"),
        ("def my_kl(mean, log_var):\n    return 0.5 * (mean ** 2 + log_var.exp() ** 2 - 1.0 - log_var)\n",
         "Monte Carlo")],
    "ex11_find_the_bug_check": [
        ("def fixed_sample(mean, log_var, eps):\n    return mean + log_var.exp() * eps\n", "the standard deviation"),
        ("def fixed_sample(mean, log_var, eps):\n"
         "    return (mean + (0.5 * log_var).exp() * eps).detach()\n", "reparameterisation trick")],
    "ex11_snr_check": [
        ("def my_snr_one_timestep(schedule, data_std):\n    a = schedule.alpha_bars\n"
         "    return int(torch.nonzero(a * data_std / (1 - a) <= 1)[0])\n", "Square the std"),
        ("def my_snr_one_timestep(schedule, data_std):\n    a = schedule.alpha_bars[1:]\n"
         "    return int(torch.nonzero(a * data_std ** 2 / (1 - a) <= 1)[0])\n", "you gave")],
    # 12
    "ex12_target_check": [
        ("def my_distillation_target(x_t, x_next, alpha_t, sigma_t, alpha_next, sigma_next):\n    return x_next\n",
         "landing point"),
        ("def my_distillation_target(x_t, x_next, alpha_t, sigma_t, alpha_next, sigma_next):\n"
         "    ratio = sigma_t / sigma_next\n    return (x_next - ratio * x_t) / (alpha_next - ratio * alpha_t)\n",
         "one student step")],
    "ex12_find_the_bug_check": [
        ("def fixed_coefficients(sigma_bar, sigma_data=0.5):\n"
         "    return sigma_bar ** 2 / (sigma_bar ** 2 + sigma_data ** 2), "
         "sigma_bar * sigma_data / (sigma_bar ** 2 + sigma_data ** 2) ** 0.5\n", "f\\(x, 0\\) = x must hold"),
        ("def fixed_coefficients(sigma_bar, sigma_data=0.5):\n"
         "    return sigma_data ** 2 / (sigma_bar ** 2 + sigma_data ** 2), "
         "sigma_bar * sigma_data / (sigma_bar ** 2 + sigma_data ** 2)\n", "standard deviation of x0")],
    "ex12_multistep_check": [
        ("def my_consistency_sample(model, times, x_T, noises, schedule):\n"
         "    return model.x0(x_T, torch.full((len(x_T),), times[0]))\n", "one-call prediction"),
        ("def my_consistency_sample(model, times, x_T, noises, schedule):\n    state = x_T\n"
         "    for t, z in zip(times[1:], noises):\n        a = float(schedule.alpha_bars[t])\n"
         "        state = a ** 0.5 * state + (1 - a) ** 0.5 * z\n"
         "    return model.x0(state, torch.full((len(x_T),), times[-1]))\n", "re-noise the prediction")],
    # 13
    "ex13_conv_delta_check": [
        ("def my_conv_delta(down, up, scale):\n    return torch.einsum('oj,jikl->oikl', up[:, :, 0, 0], down)\n",
         "scale alpha / r is missing"),
        ("def my_conv_delta(down, up, scale):\n"
         "    return scale ** 2 * torch.einsum('oj,jikl->oikl', up[:, :, 0, 0], down)\n", "applied twice")],
    "ex13_find_the_bug_check": [
        ("def fixed_init(d_in, d_out, rank):\n    return torch.zeros(rank, d_in), torch.zeros(d_out, rank)\n",
         "nothing ever moves"),
        ("def fixed_init(d_in, d_out, rank):\n    return torch.randn(rank, d_in), torch.randn(d_out, rank)\n",
         "start away from the pretrained")],
    "ex13_stack_check": [
        ("def my_stack(down1, up1, s1, down2, up2, s2):\n    return torch.cat([down1, down2]), torch.cat([up1, up2], 1)\n",
         "scales are missing"),
        ("def my_stack(down1, up1, s1, down2, up2, s2):\n"
         "    return torch.cat([s1 * down1, s2 * down2]), torch.cat([s1 * up1, s2 * up2], 1)\n", "applied twice")],
    # 14
    "ex14_convert_check": [
        ("def my_x0_and_eps(x, v, tau):\n    return x - tau * v, x - (1 - tau) * v\n", "signs are swapped"),
        ("def my_x0_and_eps(x, v, tau):\n    return x + tau * v, x + (1 - tau) * v\n", r"x0 = x - tau v")],
    "ex14_find_the_bug_check": [
        ("def fixed_euler(velocity, x1, steps):\n    x, taus = x1, torch.linspace(1e-3, 1.0, steps + 1, dtype=x1.dtype)\n"
         "    for tau, tau_next in zip(taus[:-1], taus[1:]):\n"
         "        x = x + (tau_next - tau) * velocity(x, torch.full((len(x),), float(tau), dtype=x1.dtype))\n"
         "    return x\n", "starts at the noise"),
        ("def fixed_euler(velocity, x1, steps):\n    x, taus = x1, torch.linspace(1.0, 0.0, steps + 1, dtype=x1.dtype)\n"
         "    for tau, tau_next in zip(taus[:-1], taus[1:]):\n"
         "        x = x - (tau_next - tau) * velocity(x, torch.full((len(x),), float(tau), dtype=x1.dtype))\n"
         "    return x\n", "starts at the noise")],
    "ex14_one_step_check": [
        ("def my_one_euler_step(x1, data_mean):\n    return x1.clone()\n", "does not stay at x1"),
        ("def my_one_euler_step(x1, data_mean):\n    return 2 * x1 - data_mean\n", "goes the wrong way")],
}


def _checks_by_notebook() -> dict[str, list[str]]:
    found: dict[str, list[str]] = defaultdict(list)
    for path in sorted(NOTEBOOKS_DIR.glob("*.ipynb")):
        for cell in load(path)["cells"]:
            if nbgrader(cell).get("grade") and cell["cell_type"] == "code":
                found[path.name].append(nbgrader(cell)["grade_id"])
    return found


def test_every_graded_exercise_has_at_least_two_mistakes_listed() -> None:
    checks = {check for ids in _checks_by_notebook().values() for check in ids}
    missing = sorted(check for check in checks if len(MISTAKES.get(check, [])) < 2)
    assert not missing, f"checks without two listed mistakes: {missing}"
    assert not set(MISTAKES) - checks, f"mistakes listed for checks that do not exist: {set(MISTAKES) - checks}"


@pytest.mark.parametrize("notebook", sorted(_checks_by_notebook()), ids=lambda name: name[:2])
def test_each_check_rejects_its_listed_mistakes(notebook: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.setenv("MINIDIFF_FAST", "1")
    cells = load(NOTEBOOKS_DIR / notebook)["cells"]
    last_check = max(index for index, cell in enumerate(cells) if nbgrader(cell).get("grade"))
    namespace: dict = {}
    accepted: list[str] = []
    for index, cell in enumerate(cells[:last_check + 1]):
        source = cell_source(cell)
        if cell["cell_type"] != "code" or only_displays(source):
            continue
        grade_id = nbgrader(cell).get("grade_id", "")
        if grade_id in MISTAKES:
            solution = cell_source(cells[index - 1])
            for wrong, hint in MISTAKES[grade_id]:
                exec(compile(wrong, f"{grade_id} (a mistake)", "exec"), namespace)
                try:
                    exec(compile(source, f"{notebook}[{index}]", "exec"), namespace)
                except ExerciseWrong as verdict:
                    if hint is not None and not re.search(hint, str(verdict)):
                        accepted.append(f"{grade_id}: rejected, but without the hint /{hint}/: {verdict}")
                else:
                    accepted.append(f"{grade_id} accepted a mistake:\n{wrong}")
            exec(compile(solution, f"{notebook}[{index - 1}]", "exec"), namespace)
        exec(compile(source, f"{notebook}[{index}]", "exec"), namespace)
    assert not accepted, "\n\n".join(accepted)
