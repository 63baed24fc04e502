from glob import glob

from setuptools import find_packages, setup

package_name = "omnistream_perception"

setup(
    name=package_name,
    version="0.1.0",
    packages=find_packages(exclude=["test"]),
    data_files=[
        ("share/ament_index/resource_index/packages", ["resource/" + package_name]),
        ("share/" + package_name, ["package.xml"]),
        ("share/" + package_name + "/config", glob("config/*.yaml") + glob("config/*.xml")),
        ("share/" + package_name + "/launch", glob("launch/*.launch.py")),
    ],
    install_requires=["setuptools"],
    zip_safe=True,
    maintainer="OmniStream team",
    maintainer_email="omnistream@example.com",
    description="OmniStream streaming backbone, geometry heads and the ROS 2 perception node",
    license="Apache-2.0",
    entry_points={
        "console_scripts": [
            "perception_node = omnistream_perception.ros.perception_node:main",
        ],
    },
)
