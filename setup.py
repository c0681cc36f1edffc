"""The package's metadata is in setup.cfg. This adds one thing: a wheel carries the example job
specs, studies and loops (jobs/, benchmarks/studies/, examples/) as mpidl/_examples/, so that
`mpidl examples --copy DIR` works from a pip install. An editable install reads the checkout's."""
import ast
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def example_files() -> list:
    """mpidl.install.examples.FILES, read without importing mpidl (the build may not have its requirements)."""
    module = ast.parse((HERE / "mpidl" / "install" / "examples.py").read_text())
    patterns = next(ast.literal_eval(node.value) for node in module.body if isinstance(node, ast.Assign)
                    and any(getattr(t, "id", None) == "FILES" for t in node.targets))
    return [p for pattern in patterns for p in sorted(HERE.glob(pattern)) if p.is_file()]


class build_py_with_examples(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return
        for path in example_files():
            target = Path(self.build_lib) / "mpidl" / "_examples" / path.relative_to(HERE)
            self.mkpath(str(target.parent))
            self.copy_file(str(path), str(target))


setup(cmdclass={"build_py": build_py_with_examples})
