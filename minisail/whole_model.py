"""A refusal that holds for a whole model: `WholeModelRefusals`, a mixin of every minisail model class.

Some modules cannot take every conversion or state-dict load: the Linears `speed_up_on_cpu` prepares for the CPU
hold weights in a kernel's own packed form (minisail/fast/prepared.py). Each refuses by itself, but a module is
reached only after the modules visited before it have changed: a refused `model.float()` left the vision tower half
float32, a refused `load_state_dict` had overwritten the parameters loaded before. So the model asks every module
that can refuse (duck-typed: `check_conversion(fn)`, `check_state_dict_load(state_dict, prefix)`) first, and a
refusal changes nothing. A model whose modules are all plain has nothing to ask. The model code stays free of the
fast paths (tests/loading/test_fast_is_a_hook.py): this module only calls the methods they define.
"""

from __future__ import annotations


class WholeModelRefusals:
    """Mixin: every module's refusal is asked before a conversion (.to(), .float(), ...) or a state-dict load."""

    def _apply(self, fn, recurse=True):
        if recurse:
            for module in self.modules():
                check = getattr(module, "check_conversion", None)
                if check is not None:
                    check(fn)  # raises where `fn` cannot apply to that module: nothing has changed yet
        return super()._apply(fn, recurse)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        for name, module in self.named_modules():
            check = getattr(module, "check_state_dict_load", None)
            if check is not None:
                check(state_dict, f"{name}." if name else "")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
