# systemd-analyze (Debian's systemd package) for tests/test_systemd_unit.py: `systemd-analyze verify`
# checks every line of config/dicom-fhir-scp.service. Only the tool is used; no service is started.
command -v systemd-analyze >/dev/null || apt_install systemd
