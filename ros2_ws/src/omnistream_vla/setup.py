from glob import glob

from setuptools import find_packages, setup

package_name = "omnistream_vla"

setup(
    name=package_name,
    version="0.1.0",
    packages=find_packages(exclude=["test"]),
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + package_name]),
        ("share/" + package_name, ["package.xml"]),
        ("share/" + package_name + "/config", glob("config/*.yaml")),
        ("share/" + package_name + "/launch", glob("launch/*.launch.py")),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="OmniStream team",
    maintainer_email="omnistream@example.com",
    description="OmniStream VLA policy (features + instruction -> Qwen2.5 -> 7-DoF actions), the VLA node and the recorder",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "vla_node = omnistream_vla.ros.vla_node:main",
            "recorder_node = omnistream_vla.ros.recorder_node:main",
        ],
    },
)
