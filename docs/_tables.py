"""Hand-kept tables the page generator (``docs/_gen.py``) reads, one entry per registered method.

``FORMULAS[name] = (forward, backward)``: the forward formula and the analytic backward the code
computes (g: the cotangent of the primary output; means and sums over the partition's reduce set;
sym(A) = (A + Aᵀ)/2), after /work/shared/math/BACKWARD.md and the methods' docstrings. A method
registered without an entry here is looked up in its docstring (a paragraph that states its
"Backward:"); a method with neither makes the docs build fail (a Sphinx warning under ``-W``), so
that every page has its backward.

``EQUIVALENTS[name] = (torch, jax, flax, equinox)``: the closest function or layer of each
framework, ``None`` where the framework has none. Torch names are checked against the installed
torch at build time; the JAX ecosystem columns name the library (``jax.nn``, ``optax``, ``flax``,
``equinox``) and are not imported.
"""

STD = "x̂ = (x − μ)·s, s = (σ² + ε)^-1/2, μ and σ² (biased) over the reduce set"
STD_BWD = ("dx̂ = γ·g;  dx = s·(dx̂ − mean(dx̂) − x̂·mean(dx̂·x̂));  dγ = Σ g·x̂, dβ = Σ g "
           "(over every axis but the parameter's)")
SCALE_BWD = ("r = (mean(x²) + ε)^-1/2, x̂ = x·r;  dx̂ = γ·g;  dx = r·(dx̂ − x̂·mean(dx̂·x̂));  "
             "dγ = Σ g·x̂")
POP_BWD = ("training=False: the running statistics are constants, dx = γ·g·(running_var + ε)^-1/2; "
           "running statistics carry no gradient (Eqn 18)")
WHITEN_BWD = (
    "Σ = Xc·Xcᵀ/m + εI = D·Λ·Dᵀ, X̂ = W·Xc;  dW = G·Xcᵀ, dXc = Wᵀ·G, then by method — "
    "ZCA: dΣ = D·(K ∘ (Dᵀ·sym(dW)·D))·Dᵀ with K_ij = −1/(√λi·√λj·(√λi + √λj)) (no 1/(λi − λj): exact at "
    "equal eigenvalues); PCA: dD = Xc·Gᵀ·diag(f(λ)), dλ_k = f′(λ_k)·Σ_j G_kj·(Dᵀ·Xc)_kj, "
    "dΣ = D·(diag(dλ) + F ∘ (Dᵀ·dD))·Dᵀ, F_ij = 1/(λj − λi); Cholesky (Σ = L·Lᵀ, X̂ = L⁻¹·Xc): "
    "dXc = L⁻ᵀ·G, dL = tril(−L⁻ᵀ·G·X̂ᵀ), dΣ = sym(L⁻ᵀ·Φ(Lᵀ·dL)·L⁻¹); IterNorm / Newton–Schulz: reverse "
    "through the T unrolled iterations; common tail: dXc += 2·sym(dΣ)·Xc/m, dX = dXc − mean_cols(dXc)"
)

FORMULAS = {
    "batch_norm": (
        "y = γ·(x − μ_B)/√(σ_B² + ε) + β, μ_B, σ_B² per channel over (N, *spatial); training with running "
        "statistics: running ← (1 − momentum)·running + momentum·batch statistic (variance unbiased)",
        f"{STD_BWD}; {POP_BWD}",
    ),
    "instance_norm": (
        "y = γ·(x − μ_nc)/√(σ_nc² + ε) + β, statistics per sample and channel over the spatial axes",
        STD_BWD + "; with use_input_stats=False the running statistics are constants",
    ),
    "layer_norm": (
        "y = γ ⊙ (x − μ)/√(σ² + ε) + β, statistics per sample over the trailing normalized_shape axes",
        STD_BWD,
    ),
    "group_norm": (
        "y = γ·(x − μ_ng)/√(σ_ng² + ε) + β, statistics per sample and group of C/G channels over "
        "(C/G, *spatial)",
        STD_BWD,
    ),
    "rms_norm": (
        "y = γ ⊙ x/√(mean(x²) + ε) over the trailing normalized_shape axes (ε = None: the dtype's epsilon)",
        SCALE_BWD,
    ),
    "mean_only_batch_norm": (
        "y = x − μ_B + β (centering over Π_BN); inference: x − running_mean + β",
        "dx = g − mean_B(g) (training; g at inference), dβ = Σ g",
    ),
    "position_norm": (
        "y = γ·(x − μ_nhw)/√(σ_nhw² + ε) + β, statistics over the C channels at each position",
        STD_BWD + " (reduce set: the channels of one position)",
    ),
    "pixel_norm": (
        "y = x/√(mean_C(x²) + ε), ε = 1e-8",
        "r = (mean_C(x²) + ε)^-1/2, x̂ = x·r;  dx = r·(g − x̂·mean_C(g·x̂))",
    ),
    "batch_group_norm": (
        "view (Gb, N/Gb, G, C/G, *spatial) standardized over (N/Gb, C/G, *spatial); y = γ·x̂ + β per channel",
        STD_BWD + " (reduce set: a batch group × a channel group)",
    ),
    "filter_response_norm": (
        "ν² = mean_HW(x²), x̂ = x/√(ν² + ε), y = γ·x̂ + β, with τ: z = max(y, τ) (TLU)",
        "TLU: dy = g·[y ≥ τ], dτ = Σ g·[y < τ];  then " + SCALE_BWD + ", dβ = Σ dy",
    ),
    "lp_batch_norm": (
        "y = γ·(x − μ_B)/(c·σ_p + ε) + β, σ_p = (mean_B|x − μ_B|^p)^(1/p) (p = ∞: max|x − μ_B|; "
        "c = √(π/2) for p = 1 with l1_factor, else 1)",
        "u = x − μ, x̂ = u/(c·σ_p + ε); ∂σ_p/∂u_i = |u_i|^(p−1)·sign(u_i)/(n·σ_p^(p−1)) (p = 1: sign(u_i)/n; "
        "p = ∞: the subgradient to the argmax, ties split equally); dû = γ·g/(c·σ_p + ε), "
        "du = dû − c·(∂σ_p/∂u)·Σ(dû·x̂), dx = du − mean(du); dγ = Σ g·x̂, dβ = Σ g",
    ),
    "batch_renorm": (
        "x̂ = ((x − μ_B)/σ_B)·r + d, r = clip(σ_B/σ, 1/r_max, r_max), d = clip((μ_B − μ)/σ, −d_max, d_max), "
        "y = γ·x̂ + β",
        "r, d stop-gradient: dx = r·s·(dx̃ − mean(dx̃) − x̃·mean(dx̃·x̃)) with x̃ = (x − μ_B)·s, dx̃ = γ·g; "
        "dγ = Σ g·x̂, dβ = Σ g (the finite-difference check differentiates the function with r, d held fixed)",
    ),
    "ghost_batch_norm": (
        "batch norm on each of the N/virtual_batch_size consecutive virtual batches, each with its own "
        "statistics; running statistics updated once per virtual batch, in order",
        STD_BWD + " (reduce set: one virtual batch × spatial axes, per channel)",
    ),
    "normalize": (
        "y = Ψ(Φ(Π(x))) reshaped back: partition Π (NAP), operation Φ (NOP), recovery Ψ (NRR)",
        "the composition of the three backwards in reverse: Ψ's gives dx̂ (and dγ, dβ), Φ's gives dx on the "
        "view (standardizing, scaling, centering, Lp or whitening: see those formulas), Π⁻¹ reshapes it back",
    ),
    "batch_whitening": (
        "X̂ = W(Σ)·(X − μ) per group of group_size features, Σ = Xc·Xcᵀ/m + εI, W by method (zca, pca, "
        "cholesky, iternorm, newton_schulz); y = γ·X̂ + β",
        WHITEN_BWD + "; dγ = Σ g·X̂, dβ = Σ g",
    ),
    "decorrelated_batch_norm": (
        "ZCA batch whitening X̂ = Σ^-1/2·(X − μ) per channel group, y = γ·X̂ + β",
        WHITEN_BWD.split(" — ")[0] + "; ZCA: dΣ = D·(K ∘ (Dᵀ·sym(dW)·D))·Dᵀ, K_ij = (f(λi) − f(λj))/(λi − λj) "
        "= −1/(√λi·√λj·(√λi + √λj)), K_ii = −½·λi^-3/2; dXc += 2·sym(dΣ)·Xc/m, dX = dXc − mean_cols(dXc)",
    ),
    "iter_norm": (
        "X̂ = (P_T/√tr Σ)·(X − μ), P_0 = I, P_k = ½(3·P_{k−1} − P_{k−1}³·Σ/tr Σ); y = γ·X̂ + β",
        "reverse through the iterations k = T…1 (P = P_{k−1}, S = Σ/t, t = tr Σ): dP += 1.5·dP_k − "
        "0.5·(dP_k·(P²·S)ᵀ + Pᵀ·dP_k·(P·S)ᵀ + (P²)ᵀ·dP_k·Sᵀ), dS += −0.5·(P³)ᵀ·dP_k; dP_T = dW/√t, "
        "dt = −½·t^-3/2·⟨dW, P_T⟩ − ⟨dS, Σ⟩/t², dΣ = dS/t + dt·I; then dXc = Wᵀ·G + 2·sym(dΣ)·Xc/m, "
        "dX = dXc − mean_cols(dXc)",
    ),
    "whitening_coloring": (
        "X̃ = Γ_g·X̂_g + β, X̂ the batch whitening (default Cholesky), Γ one learnable d×d matrix per group",
        "dΓ_g = Σ_n G_g·X̂_gᵀ, dX̂_g = Γ_gᵀ·G_g, dβ = Σ G; then the whitening backward: " + WHITEN_BWD,
    ),
    "whitening_matrix": (
        "W(sym Σ): zca Σ^-1/2 = D·Λ^-1/2·Dᵀ; pca Λ^-1/2·Dᵀ; cholesky L⁻¹; iternorm / newton_schulz: T Newton "
        "steps on Σ/tr Σ, divided by √tr Σ",
        "dΣ from dW as in the whitening backward (ZCA: Loewner divided differences; PCA: eigenvector "
        "backward with F_ij = 1/(λj − λi); Cholesky: dL = −L⁻ᵀ·dW·L⁻ᵀ restricted to the lower triangle, "
        "then Φ; Newton: reverse through the iterations), symmetrized: dΣ = sym(·)",
    ),
    "adain": (
        "y = σ_s·(x − μ_c)/σ_c + μ_s, μ, σ = √(mean((·−μ)²) + ε) per sample and channel over the spatial axes",
        "x̂ = (x − μ_c)/σ_c, ŝ = (s − μ_s)/σ_s, G′ = σ_s·g: dx = (G′ − mean(G′) − x̂·mean(G′·x̂))/σ_c, "
        "ds = (Σ g·x̂·ŝ + Σ g)/M_s",
    ),
    "wct": (
        "y = α·(Σ_s^1/2·Σ_c^-1/2·(x − μ_c) + μ_s) + (1 − α)·x, per sample and channel group",
        "Σ_c^-1/2 by the ZCA whitening backward and Σ_s^1/2 by the symmetric square root's Loewner backward "
        "(divided differences (√λi − √λj)/(λi − λj) = 1/(√λi + √λj)), both through eigh: exact at equal "
        "eigenvalues; dx = α·(whitening backward of Σ_s^1/2ᵀ·g) + (1 − α)·g",
    ),
    "switchable_norm": (
        "x̂ = (x − Σ_k w_k μ_k)/√(Σ_k v_k σ²_k + ε), k ∈ (IN, LN, BN), w = softmax(mean_weight), "
        "v = softmax(var_weight); y = γ·x̂ + β",
        "s = (Σ_k v_k σ²_k + ε)^-1/2, dx̂ = γ·g; per statistic k (reduce set R_k of n_k elements): "
        "A_k = Σ_{R_k} s·dx̂, B_k = −½·Σ_{R_k} s²·dx̂·x̂; dx = s·dx̂ − Σ_k w_k·A_k/n_k + "
        "Σ_k v_k·B_k·2(x − μ_k)/n_k; dw_k = −Σ A_k·μ_k, dv_k = Σ B_k·σ²_k, the logits through the softmax "
        "Jacobian dλ = w ∘ (dw − ⟨dw, w⟩); dγ = Σ g·x̂, dβ = Σ g",
    ),
    "batch_instance_norm": (
        "y = γ·(ρ·x̂_BN + (1 − ρ)·x̂_IN) + β, ρ ∈ [0, 1] per channel",
        "dx̂ = γ·g; dx = ρ·(BN standardization backward of dx̂) + (1 − ρ)·(IN standardization backward of dx̂); "
        "dρ = Σ dx̂·(x̂_BN − x̂_IN), dγ = Σ g·(ρ·x̂_BN + (1 − ρ)·x̂_IN), dβ = Σ g",
    ),
    "adaptive_layer_instance_norm": (
        "y = γ·(ρ·x̂_IN + (1 − ρ)·x̂_LN) + β, ρ ∈ [0, 1] per channel, γ, β per channel or generated",
        "dx̂ = γ·g; dx = ρ·(IN standardization backward) + (1 − ρ)·(LN standardization backward); "
        "dρ = Σ dx̂·(x̂_IN − x̂_LN), dγ = Σ g·(ρ·x̂_IN + (1 − ρ)·x̂_LN), dβ = Σ g (summed over broadcast axes)",
    ),
    "local_response_norm": (
        "y_i = x_i·D_i^−β, D_i = k + (α/n)·Σ_{j∈W(i)} x_j², W(i) the n = size channels around i (torch's window)",
        "dx_i = g_i·D_i^−β − (2αβ/n)·x_i·Σ_{j: i∈W(j)} g_j·x_j·D_j^(−β−1)",
    ),
    "weight_norm": (
        "w = g·v/‖v‖, the norm over every axis but dim",
        "v̂ = v/‖v‖: dg = ⟨dw, v̂⟩ (over the normalized axes), dv = g·(dw − v̂·⟨dw, v̂⟩)/‖v‖",
    ),
    "centered_weight_norm": (
        "w_i = g_i·(v_i − mean(v_i))/‖v_i − mean(v_i)‖ per output row",
        "c = v − mean(v), ŵ = c/‖c‖: dc = (g·dw − ŵ·⟨ŵ, g·dw⟩)/‖c‖, dv = dc − mean(dc), dg = ⟨dw, ŵ⟩",
    ),
    "weight_standardization": (
        "w_i = (v_i − μ_i)/√(σ_i² + ε) per output row (biased variance, ε inside the root)",
        "ŵ = (v − μ)·s, s = (σ² + ε)^-1/2: dv = s·(dw − mean(dw) − ŵ·mean(dw·ŵ))",
    ),
    "orthogonal_weight_norm": (
        "W = (Vc·Vcᵀ)^-1/2·Vc per group of rows, Vc the row-centred V",
        "M = (Vc·Vcᵀ)^-1/2 = D·Λ^-1/2·Dᵀ: dM = dW·Vcᵀ, dS = D·(K ∘ (Dᵀ·sym(dM)·D))·Dᵀ (Loewner K as ZCA), "
        "dVc = M·dW + 2·dS·Vc, dV = dVc − mean(dVc)",
    ),
    "oni": (
        "V̂ = Zc/‖Zc‖_F, S = V̂·V̂ᵀ, B_0 = I, B_t = 3/2·B_{t−1} − 1/2·B_{t−1}³·S, W = B_T·V̂ per group of rows",
        "W = P_T·Zc with P_T IterNorm's trace-normalized Newton iteration on Zc·Zcᵀ: the IterNorm backward "
        "through the unrolled iterations gives dΣ, then dZc = P_Tᵀ·dW + 2·sym(dΣ)·Zc, dV = dZc − mean(dZc)",
    ),
    "spectral_norm": (
        "W_SN = W/σ, σ = uᵀ·W·v by power iteration (u, v the updated state)",
        "u, v constants: dW = dW_SN/σ − (⟨dW_SN, W⟩/σ²)·u·vᵀ",
    ),
    "orthogonal_penalty": (
        "ψ(W) with G = W·Wᵀ (or Wᵀ·W), M = G − I: ‖M‖²_F, DSO, off-diagonal, mutual coherence max|M_ij|, "
        "SRIP σ_max(M)",
        "Ω = ∂ψ/∂G: 2·M for the squared forms; sign(M_ij) on the maximal entries (mc); sign(λ_k)·q_k·q_kᵀ for "
        "the largest |λ| (srip); dW = g·(Ω + Ωᵀ)·W (rows) or g·W·(Ω + Ωᵀ) (columns)",
    ),
    "cosine_norm": (
        "y_j = ⟨x, w_j⟩/(‖x‖·‖w_j‖), norms √(‖·‖² + ε)",
        "x̂ = x/‖x‖, ŵ = w/‖w‖: dx̂ = g·ŵ, dŵ = gᵀ·x̂, dx = (dx̂ − x̂·⟨x̂, dx̂⟩)/‖x‖, dw = (dŵ − ŵ·⟨ŵ, dŵ⟩)/‖w‖",
    ),
    "block_gradient_norm": (
        "g̃ = g/max(‖g‖, ε), or ‖w‖·g/max(‖g‖, ε) with ratio=True",
        "ĝ = g/‖g‖: d(grad) = (c − ĝ·⟨ĝ, c⟩)/‖g‖ (times ‖w‖ with ratio; c/ε below the floor), "
        "d(weight) = ⟨c, g̃⟩·w/‖w‖² with ratio",
    ),
    "lars": (
        "λ = η·‖w‖/(‖g‖ + wd·‖w‖ + ε) (1 where ‖w‖ = 0 or ‖g‖ = 0), g̃ = λ·(g + wd·w)",
        "u = g + wd·w, g̃ = λ·u: d(grad) = λ·c + ⟨c, u⟩·∂λ/∂g, d(weight) = wd·λ·c + ⟨c, u⟩·∂λ/∂w with "
        "∂λ/∂g = −λ·ĝ/(‖g‖ + wd·‖w‖ + ε), ∂λ/∂w = λ·ŵ/‖w‖ − λ·wd·ŵ/(‖g‖ + wd·‖w‖ + ε)",
    ),
    "gradient_centralization": (
        "g̃_i = g_i − mean(g_i) per output row (over all axes but 0)",
        "d(grad) = c − mean(c) per row (the centering is a projection: its own adjoint)",
    ),
    # -- issue 14's methods (population statistics in training, streaming, cross-iteration, inference) --
    "batch_normalize": (
        "training: x̂ = Φ_B(x) by batch statistics (partition batch or batch_group; standardizing, centering or "
        "scaling), running statistics s ← (1 − m)·s + m·s_B; inference: x̂ = (x − μ̂)/√(σ̂² + ε) (or x − μ̂, "
        "x/√(running_mean_square + ε)); y = γ ⊙ x̂ + β (affine or generated γ, β)",
        "training: the backward of normalize (the operation's backward on the partition's view, then the "
        "recovery's); inference: the running statistics are constants, dx = γ·g·(σ̂² + ε)^-1/2 (standardizing), "
        "γ·g (centering), γ·g·(running_mean_square + ε)^-1/2 (scaling); dγ = Σ g·x̂, dβ = Σ g (summed over the "
        "broadcast axes for generated γ, β)",
    ),
    "blended_batch_norm": (
        "μ = (1 − α)·μ_run + α·μ_B, σ² = (1 − α)·σ²_run + α·m/(m − 1)·σ_B², x̂ = (x − μ)/√(σ² + ε), "
        "y = γ·x̂ + β; (μ, σ²) returned as the new running statistics (presets dinh, diminishing, momentum)",
        "exact, with (μ_run, σ²_run) constant: g′ = γ·g, s = (σ² + ε)^-1/2, κ = α·m/(m − 1): "
        "dx = s·(g′ − α·mean(g′) − κ·(x̂ − s·(μ_B − μ))·mean(g′·x̂)); dγ = Σ g·x̂, dβ = Σ g",
    ),
    "centralized_weight": (
        "W_i = V_i − mean(V_i), the mean over each output row's fan-in (all axes but 0)",
        "dV_i = dW_i − mean(dW_i) per row (the centering is a projection: its own adjoint)",
    ),
    "cross_iteration_batch_norm": (
        "past statistics compensated to the current weights θ_t by a first-order Taylor step, "
        "μ′ = μ_{t−τ} + ρ·(∂μ_{t−τ}/∂θ)·(θ_t − θ_{t−τ}) (ν′ likewise, ν = E[x²]); μ̄ = mean_τ μ′, "
        "σ̄² = mean_τ max(ν′, μ′²) − μ̄²; y = γ·(x − μ̄)/√(σ̄² + ε) + β",
        "every past (compensated) statistic and θ constant; the current batch's μ_t, ν_t enter with weight 1/k "
        "(1/k_c per channel with invalid='drop'): s = (σ̄² + ε)^-1/2, x̂ = (x − μ̄)·s, dx̂ = γ·g, "
        "dx = s·(dx̂ − mean(dx̂)/k − x̂·mean(dx̂·x̂)/k); dγ = Σ g·x̂, dβ = Σ g",
    ),
    "eval_norm": (
        "μ̂ = α·μ_x + (1 − α)·μ_p, σ̂² = β·σ_x² + (1 − β)·σ_p² + β(1 − β)·(μ_x − μ_p)², y = γ·(x − μ̂)/√(σ̂² + ε) + b, "
        "μ_x, σ_x² the example's own statistics per channel over its spatial positions",
        "exact: s = (σ̂² + ε)^-1/2, x̂ = (x − μ̂)·s, dx̂ = γ·g, per sample and channel A = −s·Σ_sp dx̂, "
        "B = −½·s²·Σ_sp dx̂·x̂; dμ_x = α·A + 2β(1 − β)·(μ_x − μ_p)·B, dσ_x² = β·B; dx = s·dx̂ + dμ_x/M + "
        "2·dσ_x²·(x − μ_x)/M; dα = Σ A·(μ_x − μ_p), dβ = Σ B·(σ_x² − σ_p² + (1 − 2β)·(μ_x − μ_p)²) (without the "
        "mixture term: Σ B·(σ_x² − σ_p²)); dγ = Σ g·x̂, db = Σ g",
    ),
    "memorized_batch_norm": (
        "μ̄ = Σ_i η_i·μ_{t−i}, σ̄² = Σ_i η_i·(σ²_{t−i} + μ²_{t−i}) − μ̄² (pooled) or Σ_i η_i·σ²_{t−i} (average) over "
        "the current and the last k − 1 batches; y = γ·(x − μ̄)/√(σ̄² + ε) + β",
        "the memorized statistics constant, the current batch's with weight η_0: s = (σ̄² + ε)^-1/2, x̂ = (x − μ̄)·s, "
        "dx̂ = γ·g; pooled: dx = s·(dx̂ − η_0·mean(dx̂) − η_0·x̂·mean(dx̂·x̂)); average: dx = s·dx̂ − η_0·s·mean(dx̂) − "
        "η_0·s²·mean(dx̂·x̂)·(x − μ_t); dγ = Σ g·x̂, dβ = Σ g",
    ),
    "moving_average_batch_norm": (
        "χ²_t = mean(x²) per channel over (N, *spatial), ψ̄_t = (χ²_t + Σ_{τ=1}^{m−1} χ²_{t−τ})/m, z = x/√(ψ̄_t + ε), "
        "y = γ·r·z + β (no centering; r the batch-renormalization factor, a constant)",
        "the paper's: ĝ = γ·r·g, Ψ_t = mean(ĝ·z), Ψ̄_t = (Ψ_t + Σ_{τ=1}^{m−1} Ψ_{t−τ})/m, dx = (ĝ − z·Ψ̄_t)/√(ψ̄_t + ε) "
        "(without past_grad_stats: the exact derivative with the past χ² held fixed); dγ = Σ g·r·z, dβ = Σ g",
    ),
    "online_norm": (
        "per sample n of the stream: y_n = γ·(x_n − μ̂_{n−1})/√(σ̂²_{n−1} + ε) + β, μ̂_n = α_f·μ̂_{n−1} + "
        "(1 − α_f)·μ(x_n), σ̂²_n = α_f·σ̂²_{n−1} + (1 − α_f)·σ²(x_n) + α_f(1 − α_f)·(μ(x_n) − μ̂_{n−1})²",
        "Algorithm 2, per sample n, with u = error_mean and v = error_proj carried across samples and batches "
        "(ŷ the normalized value): g′ = γ·g_n − (1 − α_b)·v·ŷ_n, v += mean_sp(g′·ŷ_n), "
        "dx_n = g′/√(σ̂²_{n−1} + ε) − (1 − α_b)·u, u += mean_sp(dx_n); α_b = 1: the exact derivative with the stream "
        "frozen; dγ = Σ g·ŷ, dβ = Σ g",
    ),
    "population_norm": (
        "μ̂ ← (1 − f)·μ̂ + f·μ_B, σ̂² ← (1 − f)·σ̂² + f·m/(m − 1)·σ_B², then x̂ = x − μ̂ (centering) or "
        "(x − μ̂)/√(σ̂² + ε), y = γ·x̂ + β",
        "μ̂, σ̂² constants: dx = γ·g (centering) or γ·g/√(σ̂² + ε); dγ = Σ g·x̂, dβ = Σ g",
    ),
    "power_norm": (
        "X̂ = X/ψ_{t−1}, Y = γ·X̂ + β, ψ = √(ψ² + ε), ψ_B² = mean_B(x²), ψ_t² = α_f·ψ²_{t−1} + (1 − α_f)·ψ_B² "
        "(pn-v: X̂ = X/ψ_B by the batch quadratic mean)",
        "the paper's approximate backward: X̃′ = γ·g − ν_{t−1}·X̂, dX = X̃′/ψ_{t−1}, ν_t = ν_{t−1}·(1 − (1 − α_b)·Γ_t) "
        "+ (1 − α_b)·Λ_t with Γ_t = mean_B(x̂²), Λ_t = mean_B(x̂·γ·g); pn-v: the exact dX = (g′ − X̂·mean_B(g′·X̂))/ψ_B, "
        "g′ = γ·g; dγ = Σ g·X̂, dβ = Σ g",
    ),
    "prong_whitening": (
        "μ̂ ← (1 − f)·μ̂ + f·μ_B, Σ̂ ← (1 − f)·Σ̂ + f·Σ_B at the steps k ≡ 0 (mod T); x̂ = U·(x − μ̂), "
        "U = W(Σ̂ + εI) (PCA by default), y = γ·x̂ + β per group of group_size channels",
        "μ̂, Σ̂ and U constants: dx = Uᵀ·(γ·g) per group (the inference backward of batch_whitening); "
        "dγ = Σ g·x̂, dβ = Σ g",
    ),
}

_N = None  # none in that framework

EQUIVALENTS = {
    "batch_norm": ("torch.nn.functional.batch_norm", "jax.nn.standardize (no running statistics, no affine)",
                   "flax.nnx.BatchNorm", "equinox.nn.BatchNorm"),
    "instance_norm": ("torch.nn.functional.instance_norm", _N, "flax.nnx.InstanceNorm", _N),
    "layer_norm": ("torch.nn.functional.layer_norm", "jax.nn.standardize (no affine)", "flax.nnx.LayerNorm",
                   "equinox.nn.LayerNorm"),
    "group_norm": ("torch.nn.functional.group_norm", _N, "flax.nnx.GroupNorm", "equinox.nn.GroupNorm"),
    "rms_norm": ("torch.nn.functional.rms_norm", _N, "flax.nnx.RMSNorm", "equinox.nn.RMSNorm"),
    "local_response_norm": ("torch.nn.functional.local_response_norm", _N, _N, _N),
    "weight_norm": ("torch.nn.utils.parametrizations.weight_norm", _N, "flax.nnx.WeightNorm",
                    "equinox.nn.WeightNorm"),
    "spectral_norm": ("torch.nn.utils.parametrizations.spectral_norm", _N, "flax.nnx.SpectralNorm",
                      "equinox.nn.SpectralNorm"),
    "lars": (_N, "optax.lars", _N, _N),
    "cayley": ('torch.nn.utils.parametrizations.orthogonal (orthogonal_map="cayley")', _N, _N, _N),
    "matrix_exp_orthogonal": ('torch.nn.utils.parametrizations.orthogonal (orthogonal_map="matrix_exp")', _N, _N,
                              _N),
    "householder_orthogonal": ('torch.nn.utils.parametrizations.orthogonal (orthogonal_map="householder")', _N,
                               _N, _N),
    "cosine_norm": ("torch.nn.functional.cosine_similarity (the normalized dot product, without the layer)",
                    _N, _N, _N),
}
