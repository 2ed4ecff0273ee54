"""The paper's released checkpoints spelled in this project's parameter names.

The release (``snn_ide_conv``/``snn_ide_fc`` wrappers, ``network_x``/``network_s``
modules, weight-norm style ``weight_w``/``weight_g``/``weight_u``/``weight_v``
entries for the feedback) registers some modules twice; `from_release` keeps
one canonical entry per parameter and maps it onto `build_model`'s keys.
"""
import re

# Feedback-weight entries of the paper's release -> this project's parametrize keys.
_FEEDBACK = 'snn.feedback.linear.parametrizations.weight.'
_PAPER_FEEDBACK_SUFFIX = {
    'weight_w': 'original',
    'weight_g': '0.g',
    'weight_u': '0.u',
    'weight_v': '0.v',
}



def _paper_alias_target(key):
    """The canonical key a paper-release alias stands for; '' for a stale copy, None for no alias."""
    for outer in ('snn_ide_conv.', 'snn_ide_fc.'):
        if key.startswith(outer):
            key = key[len(outer):]
    if key.startswith('snn_func_copy.'):
        return ''
    if not key.startswith('snn_func.'):
        return None
    key = key[len('snn_func.'):]
    listed = re.match(r'network_s_list\.(\d+)\.(.*)', key)
    if listed:
        return f'network_s{int(listed.group(1)) + 1}.{listed.group(2)}'
    return key


def _paper_to_project_key(key, last_layer):
    """Map one canonical key of the paper's release to this project's key."""
    if key.startswith('classifier.'):
        return key
    match = re.match(r'network_x\.(conv|fc|bn)\.(.*)', key)
    if match:
        part = 'bn' if match.group(1) == 'bn' else 'linear'
        return f'snn.input_layer.{part}.{match.group(2)}'
    match = re.match(r'network_s(\d*)\.(conv|fc|convT|bn)\.(.*)', key)
    if match:
        index, op, name = match.groups()
        is_feedback = index == '' or int(index) == last_layer
        if is_feedback and op != 'bn' and name in _PAPER_FEEDBACK_SUFFIX:
            return _FEEDBACK + _PAPER_FEEDBACK_SUFFIX[name]
        if not is_feedback and op in ('conv', 'fc', 'bn'):
            part = 'bn' if op == 'bn' else 'linear'
            return f'snn.layers.{int(index) - 1}.{part}.{name}'
    raise ValueError(f"the paper's checkpoint entry {key} has no counterpart in this project")


def _from_paper_layout(sd):
    """A paper-release state_dict's canonical entries (aliases fill gaps, stale copies go), mapped."""
    canonical = {}
    aliases = {}
    for key, value in sd.items():
        target = _paper_alias_target(key)
        if target is None:
            canonical[key] = value
        elif target:
            aliases[target] = value
    # Aliases are the same modules registered again: they matter only if a canonical entry is absent.
    for key, value in aliases.items():
        canonical.setdefault(key, value)
    indices = [int(m.group(1)) for m in (re.match(r'network_s(\d+)\.', k) for k in canonical) if m]
    last_layer = max(indices, default=None)
    return {_paper_to_project_key(k, last_layer): v for k, v in canonical.items()}



def is_release_layout(state_dict):
    """Whether state_dict uses the paper's release names (a ``network_x.`` entry)."""
    return any(k.startswith('network_x.') for k in state_dict)


def from_release(state_dict):
    """A new state_dict with this project's keys for one in the paper's release layout."""
    return _from_paper_layout(state_dict)
