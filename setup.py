"""Everything is declared in pyproject.toml; this file only installs lmshrink_lm_eval.pth at the top of
site-packages (for wheels and editable installs alike), which pyproject.toml cannot express. Python runs a .pth's
import line at interpreter start: see src/_lmshrink_lm_eval.py for what it does and why."""

import os
import shutil

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.editable_wheel import editable_wheel

PTH = "lmshrink_lm_eval.pth"
SOURCE = os.path.join("src", PTH)


class BuildPyWithPth(build_py):
    def run(self):
        super().run()
        self.copy_file(SOURCE, os.path.join(self.build_lib, PTH), preserve_mode=False)

    def get_outputs(self, include_bytecode=True):
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH)]


class EditableWheelWithPth(editable_wheel):
    # An editable wheel holds only a path entry for src/; everything in its unpacked folder is written into it.
    def _install_namespaces(self, installation_dir, pth_prefix):
        super()._install_namespaces(installation_dir, pth_prefix)
        shutil.copyfile(SOURCE, os.path.join(installation_dir, PTH))


setup(cmdclass={"build_py": BuildPyWithPth, "editable_wheel": EditableWheelWithPth})
