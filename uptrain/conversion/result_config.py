"""The result's config.json: the source's with the form's changes for G (uptrain/arch), and the auto_map of the
uptrain.modeling template that travels with it, if any; a source's own auto_map does not carry over."""
from __future__ import annotations

from uptrain.arch import AttentionSpec


def result_config(spec: AttentionSpec, config: dict, groups):
    """(config.json of the result, the uptrain.modeling Template that must travel with it or None when the
    result is native). The source's auto_map never carries over: a source that was itself converted to remote
    code loses it when the result is native (GPT-2 GQA-2 → MQA is a gpt_bigcode checkpoint), and a source's own
    modeling code (foreign_auto_map) is neither run nor copied, so an auto_map naming it would point at files
    the result does not hold."""
    from uptrain.modeling import TEMPLATES

    form = spec.result_form(config, groups)
    out = spec.result_config(config, groups)
    out.pop("auto_map", None)
    template = TEMPLATES[form.remote_code] if form.remote_code else None
    if template is not None:
        out["auto_map"] = template.auto_map()
        out["architectures"] = [template.model_class]  # what save_pretrained of the loaded model writes too
    return out, template


def foreign_auto_map(config: dict) -> dict | None:
    """The source's auto_map when it names modeling code other than uptrain's templates (its own, or another
    Hub repo's): the result drops it (result_config), and the converter says so. None otherwise."""
    from uptrain.modeling import TEMPLATES, code_files

    auto_map = config.get("auto_map")
    if not auto_map:
        return None
    named = code_files(auto_map)
    return None if named and set(named) <= {t.file for t in TEMPLATES.values()} else auto_map


def foreign_auto_map_note(src: str, auto_map: dict, template) -> str:
    """What the converter prints when it drops a source's own auto_map."""
    from uptrain.modeling import code_files

    kept = (f"it carries uptrain's {template.file} instead" if template is not None else
            "it is a native checkpoint: transformers loads it with its own class, with or without "
            "trust_remote_code=True")
    return (f"note: {src}'s config.json names its own modeling code ({', '.join(code_files(auto_map))}, in "
            f"auto_map); uptrain neither runs nor copies it, so the result's config.json has no auto_map for it: "
            f"{kept}. The source's auto_map is recorded in uptrain.json (conversion.dropped_auto_map).")
