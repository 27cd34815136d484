"""The correction methods, one module each, and what they share.

Every method takes the model under study and the case's data, never mutates the model it is
given, and returns a :class:`~core.methods.corrections.common.Correction`: the corrected model and
a record (what was chosen, on what grid, how long it took). :mod:`.catalogue` lists them (label,
what each uses to know where the shortcut is) and runs one by name; :mod:`.measure` measures a
model for the table; the corrections stage (:mod:`core.stages.corrections`) runs them on a case.

==========================  =======================================================  =========
method                      what it does                                             uses mask
==========================  =======================================================  =========
``suppression``             damp the shortcut experts of one layer: scale the next    no
                            layer's incoming weights of the chosen units by ``d``
                            (exactly the unit's activation × d) in a plain conv /
                            dense chain; any other layer (a residual block, a
                            nested one, BatchNorm after it) is wrapped in a
                            :class:`UnitScale` that multiplies those output
                            channels by ``d``. Experts are found
                            mask-free: class experts (distributional influence)
                            whose interpretation puts its positive attribution on
                            the image border (outside the central 20×20 box where
                            MNIST centres its digits).
``pclarc``                  P-ClArC (Anders et al. 2022): a wrapper module projects   yes (clean
                            the concept direction v (normalised difference of the     twins)
                            mean activation with and without the patch) out of one
                            layer's output, a' = a − v(vᵀa − vᵀz̄), z̄ the clean mean.
                            The wrapped layer's weights are untouched.
``rrr``                     Right for the Right Reasons (Ross et al. 2017): fine-     yes
                            tune with λ·‖mask ⊙ ∂Σ_k log p_k/∂x‖² (double backprop).
``influence_penalty``       fine-tune with λ·‖R ⊙ ∂Σ_k log p_k/∂z‖² at a slice z,     no
                            R the shortcut region found mask-free from the vanilla
                            model's distributional influence (see below).
``counterexamples``         fine-tune on the training set plus copies whose patch     yes
                            pixels are replaced by uniform noise.
``finetune`` (control)      the same fine-tuning with no penalty: what the extra      no
                            epochs alone do (not a correction).
==========================  =======================================================  =========

Strengths are chosen on the validation split (``data.val``: test-style random-shade decoys),
never on the test set; every record keeps its grid with the validation accuracy of each value.
"""
