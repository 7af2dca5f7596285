"""`kvwire profiles`: the presets, what each resolves to for a model, and every stage with its options."""

from __future__ import annotations

from channel.cli.app import ModelOption, app, console


@app.command("profiles")
def profiles(model: str = ModelOption) -> None:
    """List the presets (and what each resolves to for --model), then every profile stage with its
    options, defaults and bounds, from the stage registry (imports no torch)."""
    from common.profile.docs import presets_markdown, stage_table
    from common.profile.presets import DEFAULT_PROFILE

    console.print(f"Presets (default {DEFAULT_PROFILE}); the wire carries what a preset resolves to:\n",
                  markup=False, highlight=False)
    console.print(presets_markdown(model), markup=False, highlight=False, soft_wrap=True)
    console.print("\nStages: join them with + (q2c:0.5+int4:g32); per-layer stages take @A-B. The long form "
                  "(--profile-file, or an object as the HTTP API's profile) is {\"stages\": [{\"stage\": NAME, "
                  "FIELD: VALUE, ...}]}.\n", markup=False, highlight=False)
    console.print(stage_table(), markup=False, highlight=False, soft_wrap=True)
