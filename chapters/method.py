"""Background: the theory behind the report (Leino et al., ITC 2018) and how each method is one
configuration of the same influence engine."""

from __future__ import annotations

import pandas as pd
import streamlit as st

import ui


def _study():
    """The open case study, or None when none opens (the method chapter also works without one)."""
    try:
        return ui.open_study()
    except Exception:  # noqa: BLE001
        return None


def _facts(study) -> dict:
    try:
        return ui.facts(study) if study is not None else {}
    except Exception:  # noqa: BLE001
        return {}


study = _study()
facts = _facts(study)
REGION = ui.region_name(facts)
SUBJECT, REFERENCE = facts.get("subject") or "subject", facts.get("reference") or "reference"
ui.chapter(
    None, "Method",
    "Every picture in this report comes from one measurement: **distributional influence** "
    "(Leino, Sen, Datta, Fredrikson & Li, *Influence-Directed Explanations for Deep Convolutional "
    "Networks*, ITC 2018). It is fixed by three choices — *where* to look inside the network (the "
    "**slice**), *what* output to explain (the **quantity of interest**), and *for which inputs* "
    "(the **distribution of interest**). Popular attribution methods are particular settings of "
    "these choices; the paper's **experts** are the internal units with the largest influence.",
    study=study, optional=True)

st.header("1. Slice")
st.markdown(
    "Cut the network $f$ at an internal layer into a lower part $h$ and an upper part $g$. The slice "
    "is the layer's activation $z$; the input itself is the slice with no layer.")
st.latex(r"f = g \circ h, \qquad z = h(x)")

st.header("2. Quantity of interest")
st.markdown(
    "A scalar of the network's output per example. A class logit asks *why this class*; the "
    "comparative quantity asks *why this class and not that one* — it cancels what the two classes "
    "share (strokes common to a 3 and an 8) and keeps what tells them apart.")
st.latex(r"q_c(x) = f_c(x) \qquad\qquad q_{A\,\text{vs}\,B}(x) = f_A(x) - f_B(x)")
st.markdown("To interpret an expert, the quantity is that unit's own activation, $q(x) = h_k(x)$.")

st.header("3. Distribution of interest")
st.markdown(
    "The inputs the explanation must be faithful to. A single point explains one prediction; a path "
    "from a baseline $x'$ to $x$ averages over the straight line between them; a Gaussian averages over "
    "noisy copies; an empirical distribution such as *every training image of class c* explains the "
    "class as the model sees it. They compose: the path distribution of every image of a class.")
st.latex(r"""\begin{aligned}
\text{point:}\;& P = \delta_x &
\text{linear path:}\;& x' + \alpha_i (x - x'),\ \ \alpha_i = \tfrac{i + 1/2}{R},\ i = 0,\dots,R-1\\
\text{Gaussian:}\;& x + \varepsilon,\ \varepsilon \sim \mathcal N(0, \sigma^2 I) &
\text{class-conditional:}\;& x \sim \mathrm{Uniform}\{x_n : y_n = c\}
\end{aligned}""")

st.header("4. Distributional influence")
st.markdown(
    "The gradient of the quantity at the slice, averaged over the distribution of interest. This is "
    "*influence space*; multiplying by the difference to a baseline gives *attribution space* "
    "(Integrated Gradients is exactly this at the input with a linear path).")
st.latex(r"\chi(f, P) \;=\; \mathbb{E}_{x \sim P}\!\left[\left.\frac{\partial\, q(g(z))}{\partial z}"
         r"\right|_{z = h(x)}\right] \qquad\qquad a(x) = (z - z') \odot \chi")
st.markdown(
    "The paper derives the measure from three axioms: **linear agreement** (for $f(x) = w^\\top x$ the "
    "influence is $w$), **distributional marginality** (two networks whose gradients agree everywhere "
    "on the distribution get the same influence: only the behaviour on $P$ matters) and **distribution "
    "linearity** (the influence over a mixture of distributions is the mixture of their influences):")
st.latex(r"\chi\big(f, \textstyle\sum_i \lambda_i P_i\big) = \sum_i \lambda_i\, \chi(f, P_i)")

st.header("5. Experts and their interpretation")
st.markdown(
    "A convolutional unit is a channel: its spatial influence map is reduced to one score (summed, or "
    "its maximum). The **experts** are the $k$ units with the largest score. Resampling the "
    "distribution's points (bootstrap) gives each score an interval and each unit a *top-k frequency*: "
    "how often it stays among the experts — a ranking that flips under resampling says little.")
st.latex(r"s_k = \sum_{i,j} \chi_{k,i,j} \qquad \mathcal{E}_k(P) = \operatorname{top}_k\, s"
         r"\qquad \mathrm{freq}(u) = \Pr_{b}\big[u \in \operatorname{top}_k\, s^{(b)}\big]")
st.markdown(
    "An expert is interpreted by the influence of *its own activation* on the input along a linear "
    "path, times $x - x'$: an attribution map over the image. Shown as a heatmap, or — as in the paper — "
    "as a mask keeping the pixels above the 95th percentile, softly blurred. When a case marks a "
    "region in its images" + (f" (here: the **{REGION}**)" if facts.get("region") else "")
    + ", each interpretation can be scored by its "
    "**region mass**, the share of its positive attribution that falls on the region"
    + (f" (chance, the region's share of the image: {facts['chance']:.1%})" if facts.get("chance") else "")
    + ":")
st.latex(r"\mathrm{region\ mass}(a) = \frac{\sum_{p \in \text{region}} [a_p]_+}{\sum_{p} [a_p]_+}")
st.markdown(
    "The paper's *essence* claim: keeping only the top experts of a layer is enough to separate two "
    "related classes. Corrections are scored by how much of the accuracy gap between the model under "
    "study and the reference they close on the case's headline evaluation set"
    + (f" ({ui.set_label(facts['headline'])})" if facts.get("headline") else "") + ":")
_sub, _ref = (n.replace("_", r"\_") for n in (SUBJECT, REFERENCE))
st.latex(r"\mathrm{gap\ closed} = \frac{\mathrm{acc}_{\text{corrected}} - \mathrm{acc}_{\text{" + _sub
         + r"}}}{\mathrm{acc}_{\text{" + _ref + r"}} - \mathrm{acc}_{\text{" + _sub + r"}}}")

st.header("One engine, every representation")
st.markdown("Each compared method is one call of the same engine with a different configuration:")
ENGINE = pd.DataFrame(
    [
        ("saliency", "input", "class", "point", "—"),
        ("gradient × input", "input", "class", "point", "x"),
        ("Integrated Gradients", "input", "class", "linear from baseline", "x − x′"),
        ("SmoothGrad", "input", "class", "Gaussian", "—"),
        ("Grad-CAM", "last conv", "class", "point, spatial mean per channel",
         "z, summed over channels, ReLU"),
        ("internal influence / experts", "any layer", "class or A − B",
         "class-conditional empirical (× path)", "optional"),
        ("expert interpretation", "input", "unit activation", "linear", "x − x′"),
    ],
    columns=["representation", "slice", "quantity (QoI)", "distribution (DoI)", "multiplier"],
)
st.dataframe(ENGINE, hide_index=True, column_config={
    "slice": st.column_config.TextColumn(
        help="Where the influence is measured: the input pixels or one internal layer."),
    "quantity (QoI)": st.column_config.TextColumn(
        help="Quantity of interest: the output number being explained — a class's score, the difference "
             "of two classes' scores (A − B), or one unit's activation."),
    "distribution (DoI)": st.column_config.TextColumn(
        help="Distribution of interest: the inputs the gradient is averaged over — the image alone "
             "(point), a straight path from a baseline to it (linear), noisy copies (Gaussian), or every "
             "training image of a class (empirical)."),
    "multiplier": st.column_config.TextColumn(
        help="What the averaged gradient is multiplied by to give an attribution (— : nothing)."),
})
ui.download_csv(ENGINE, "engine_configurations.csv", key="dl-method-engine")

st.markdown(
    "How the report judges them: **region mass** (does the explanation point at the shortcut the model "
    "uses?), **deletion / insertion AUC** (RISE: does removing the top-ranked pixels first destroy the "
    "prediction fastest?), **model-parameter randomisation** (Adebayo et al.: an explanation that barely "
    "changes when the weights are randomised explains the image, not the model — Spearman correlation "
    "with the original map) and **sparseness**.")


def _case_settings() -> None:
    try:
        study = ui.open_study()
        cfg = study.config
    except Exception:  # the method page works without any case study
        return
    settings = {name: getattr(cfg, name, None) for name in ("experts", "representations", "corrections")}
    settings = {k: v for k, v in settings.items() if v}
    if not settings:
        return
    with st.expander(f"This case study's settings ({getattr(cfg, 'name', ui.current_case())})"):
        st.json(settings, expanded=2)


_case_settings()

st.header("References")
st.markdown("""
1. K. Leino, S. Sen, A. Datta, M. Fredrikson, L. Li. *Influence-Directed Explanations for Deep
   Convolutional Networks.* IEEE International Test Conference (ITC), 2018.
   [arXiv:1802.03788](https://arxiv.org/abs/1802.03788)
2. A. S. Ross, M. C. Hughes, F. Doshi-Velez. *Right for the Right Reasons: Training Differentiable
   Models by Constraining their Explanations.* IJCAI 2017 (RRR, DecoyMNIST).
   [arXiv:1703.03717](https://arxiv.org/abs/1703.03717)
3. C. J. Anders, L. Weber, D. Neumann, W. Samek, K.-R. Müller, S. Lapuschkin. *Finding and removing
   Clever Hans: Using explanation methods to debug and improve deep models.* Information Fusion, 2022
   (A-ClArC / P-ClArC). [arXiv:1912.11425](https://arxiv.org/abs/1912.11425)
4. J. Adebayo, J. Gilmer, M. Muelly, I. Goodfellow, M. Hardt, B. Kim. *Sanity Checks for Saliency
   Maps.* NeurIPS 2018. [arXiv:1810.03292](https://arxiv.org/abs/1810.03292)
5. V. Petsiuk, A. Das, K. Saenko. *RISE: Randomized Input Sampling for Explanation of Black-box
   Models.* BMVC 2018 (deletion / insertion). [arXiv:1806.07421](https://arxiv.org/abs/1806.07421)
6. M. Sundararajan, A. Taly, Q. Yan. *Axiomatic Attribution for Deep Networks.* ICML 2017
   (Integrated Gradients). [arXiv:1703.01365](https://arxiv.org/abs/1703.01365)
7. D. Smilkov, N. Thorat, B. Kim, F. Viégas, M. Wattenberg. *SmoothGrad: removing noise by adding
   noise.* 2017. [arXiv:1706.03825](https://arxiv.org/abs/1706.03825)
8. R. R. Selvaraju et al. *Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
   Localization.* ICCV 2017. [arXiv:1610.02391](https://arxiv.org/abs/1610.02391)
""")

ui.next_chapter("chapters/case_study.py", "back to the case study")
