"""Maps the top-level ``kernels/`` folder (and its subpackages) onto ``nncjax.kernels``."""

from setuptools import find_packages, setup

packages = find_packages(include=["nncjax", "nncjax.*"])
kernel_packages = ["nncjax.kernels"] + ["nncjax.kernels." + p for p in find_packages("kernels")]
package_dir = {"nncjax": "nncjax"}
package_dir.update({p: "kernels/" + p[len("nncjax.kernels."):].replace(".", "/") for p in kernel_packages[1:]})
package_dir["nncjax.kernels"] = "kernels"

setup(
    packages=packages + kernel_packages,
    package_dir=package_dir,
    package_data={p: ["*.txt", "*.npz", "*.msgpack"] for p in packages + kernel_packages},
)
