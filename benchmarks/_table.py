"""The min / median / max table the start-up benchmarks print: one row per case, in milliseconds, and each
median's ratio to a reference case measured in the same run ('-' when that case could not run here)."""
import statistics


def print_times(times, ref, label, width, ref_label):
    base = statistics.median(times[ref]) if ref in times else None
    print(f"{label:<{width}}{'min ms':>9}{'median ms':>11}{'max ms':>9}{'vs ' + ref_label:>9}")
    for name, xs in times.items():
        med = statistics.median(xs)
        ratio = f"{med / base:>9.2f}" if base else f"{'-':>9}"
        print(f"{name:<{width}}{min(xs):>9.1f}{med:>11.1f}{max(xs):>9.1f}{ratio}")
