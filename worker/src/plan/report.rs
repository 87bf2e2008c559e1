//! `xkd plan`'s table.

use super::{billions, gib, Memory, Plan};

/// The plan as a table, for people.
pub fn text(plan: &Plan) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let cpu = plan.device == "cpu";
    let _ = writeln!(
        out,
        "xkd plan: memory of one worker ({} workers, run.device = {})",
        plan.workers, plan.device
    );
    for m in &plan.models {
        let _ = writeln!(
            out,
            "{}: {} {}, {} parameters, {} tokens a question ({} of the clip + {} of the prompt: \
             {})\n  architecture: {}",
            m.role,
            m.family,
            m.modality,
            billions(m.parameters),
            m.tokens,
            m.clip_tokens,
            m.tokens - m.clip_tokens,
            m.prompt_tokens,
            m.architecture
        );
    }
    let _ = writeln!(
        out,
        "rows per worker and step: {} taught-class + {} replay = {} clips",
        plan.taught_rows,
        plan.replay_rows,
        plan.taught_rows + plan.replay_rows
    );
    for phase in &plan.phases {
        let _ = writeln!(out, "\n{}:", phase.name);
        for p in &phase.parts {
            let place = match (cpu, p.memory) {
                (true, _) => "",
                (false, Memory::Device) => "device ",
                (false, Memory::Host) => "host   ",
            };
            let _ = writeln!(out, "  {place}{:>9.2} GiB  {}", gib(p.bytes), p.what);
        }
        if cpu {
            let _ = writeln!(
                out,
                "  total    {:>9.2} GiB",
                gib(phase.device_bytes + phase.host_bytes)
            );
        } else {
            let _ = writeln!(
                out,
                "  total    device {:.2} GiB, host {:.2} GiB",
                gib(phase.device_bytes),
                gib(phase.host_bytes)
            );
        }
    }
    let what = if cpu { "memory" } else { "device memory" };
    let _ = writeln!(
        out,
        "\npeak {what}: {:.2} GiB ({}); capacity {:.2} GiB ({}): {}",
        gib(plan.peak_bytes),
        plan.peak_phase,
        gib(plan.capacity_bytes),
        plan.capacity_source,
        if plan.fits { "fits" } else { "does NOT fit" }
    );
    let _ = writeln!(
        out,
        "distillation step without the teacher loaded (distill.teacher = \"cached\"): {:.2} GiB",
        gib(plan.distill_without_teacher_bytes)
    );
    for note in &plan.notes {
        let _ = writeln!(out, "note: {note}");
    }
    out
}
