#!/usr/bin/env bash
# The system packages localllm needs, by their Debian/Ubuntu names: the one list that
# README.md's set-up names, `make` checks and .ci/run installs (tests/test_docs.py holds
# the README to it). Everything else (cmake included) comes from PyPI into .venv.
#
#   .ci/prerequisites.sh list [setup|test]     the packages, on one line
#   .ci/prerequisites.sh missing [setup|test]  those not installed here (empty: none)
#   .ci/prerequisites.sh check [setup|test]    exit 1 with one line: what is missing and
#                                              the command that installs it
# setup: building llama.cpp and the venv (make setup, make chat); test: make test.
set -euo pipefail

SETUP_PACKAGES=(build-essential python3-venv)
# tests/test_serve_page.py drives Debian's /usr/bin/chromium through Playwright.
TEST_PACKAGES=(chromium)

have() {
    case "$1" in
        build-essential) command -v cc && command -v c++ && command -v make ;;
        python3-venv) "${PYTHON:-python3}" -c 'import ensurepip, venv' ;;
        chromium) test -x /usr/bin/chromium ;;
        *) return 1 ;;
    esac
} >/dev/null 2>&1

action="${1:-check}"
scope="${2:-test}"
case "$scope" in
    setup) packages=("${SETUP_PACKAGES[@]}") ;;
    test) packages=("${SETUP_PACKAGES[@]}" "${TEST_PACKAGES[@]}") ;;
    *) echo "prerequisites.sh: unknown scope '$scope'; use setup or test" >&2; exit 2 ;;
esac
missing=()
for package in "${packages[@]}"; do
    have "$package" || missing+=("$package")
done

case "$action" in
    list) echo "${packages[*]}" ;;
    missing) echo "${missing[*]}" ;;
    check)
        if ((${#missing[@]})); then
            sudo=""
            [[ "$(id -u)" == 0 ]] || sudo="sudo "
            echo "make $scope needs system packages missing here: ${missing[*]}; install them: ${sudo}apt-get install -y ${missing[*]}" >&2
            exit 1
        fi
        ;;
    *) echo "prerequisites.sh: unknown action '$action'; use list, missing or check" >&2; exit 2 ;;
esac
