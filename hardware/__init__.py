"""Board profiles, detection and sensors (sysfs readers that take a root path)."""
