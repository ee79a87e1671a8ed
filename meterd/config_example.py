"""The shipped `config/meterd.toml`, written from the settings' declaration in `meterd.config`:
every setting in its section with its default and what it does, and the secrets, which the file
never holds. A test fails when the shipped file differs from `render_example()`; after changing
a setting, write the file again with

    python -m meterd.config_example > config/meterd.toml
"""

from __future__ import annotations

import json
import sys
import textwrap

from meterd.config import SECRETS, SETTINGS, Setting

COMMENT_WIDTH = 98  # characters of a comment line, "# " included

HEADER = """\
# meterd settings. Every setting is shown with its default value.
# Any setting can be overridden from the environment as METERD_<NAME>, e.g. METERD_LISTEN.
# Use with: meterd --config /etc/meterd/meterd.toml run   (or METERD_CONFIG=/etc/meterd/meterd.toml)
#
# Secrets are never read from this file. Give them in the environment or as systemd
# credentials ($CREDENTIALS_DIRECTORY/<name>):
"""


def render_example() -> str:
    """The whole file: the header, each secret, then each section's settings in their order."""
    lines = HEADER.splitlines()
    for secret in SECRETS:
        generated = (
            f" (generated once into <state_dir>/secrets/{secret.name} if missing)"
            if secret.generated
            else ""
        )
        lines.append(f"#   {secret.env_name:<28} credential {secret.name}: {secret.doc}{generated}")
    for section in dict.fromkeys(setting.section for setting in SETTINGS):
        lines += ["", f"[{section}]"]
        for setting in SETTINGS:
            if setting.section == section:
                lines += _setting_lines(setting)
    return "\n".join(lines) + "\n"


def _setting_lines(setting: Setting) -> list[str]:
    comment = textwrap.wrap(
        f"{setting.doc} (env {setting.env_name})",
        width=COMMENT_WIDTH,
        initial_indent="# ",
        subsequent_indent="# ",
        break_on_hyphens=False,
    )
    return [*comment, f"{setting.name} = {_toml_value(setting.default)}"]


def _toml_value(value: object) -> str:
    """A default as TOML: a whole number, a string (JSON's escapes are TOML's), or a list."""
    if isinstance(value, bool) or not isinstance(value, int | str | tuple):
        raise TypeError(f"no TOML form for the default {value!r}")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return json.dumps(str(value), ensure_ascii=False)
    return "[" + ", ".join(_toml_value(item) for item in value) + "]"


def main() -> None:
    sys.stdout.write(render_example())


if __name__ == "__main__":
    main()
