//! What a node class's user data does that Stratos must plan around (SPEC §5.5): whether
//! the instance powers itself off on its first boot, as the seeds' bootstrap scripts do
//! (`… sleep 30; poweroff`). Such a warming node must never be handed to workload pods: it
//! goes to standby first and is started for them (user data runs once per instance, so it
//! does not power off again). Nodes whose user data does not power off (nodeadm configs,
//! Bottlerocket TOML, scripts without it) are handed over as soon as they are warm.

/// Whether the user data powers the instance off: a shell command `poweroff`, `halt`,
/// `shutdown` (other than `-r`/`--reboot`), `systemctl poweroff|halt`, or `init 0`, in any
/// part of the script (MIME multipart included), comments aside.
pub fn powers_off(user_data: &str) -> bool {
    user_data.lines().any(|line| {
        let code = line.split('#').next().unwrap_or_default();
        code.split(['&', '|', ';', '(', ')', '`'])
            .map(str::trim)
            .any(command_powers_off)
    })
}

fn command_powers_off(command: &str) -> bool {
    let mut words = command
        .split_whitespace()
        .skip_while(|w| matches!(*w, "sudo" | "exec" | "then" | "do" | "else" | "nohup"));
    let Some(program) = words.next() else {
        return false;
    };
    let program = program.rsplit('/').next().unwrap_or(program);
    let args: Vec<&str> = words.collect();
    match program {
        "poweroff" | "halt" => true,
        "shutdown" => !args.iter().any(|a| *a == "-r" || *a == "--reboot"),
        "systemctl" => args.iter().any(|a| matches!(*a, "poweroff" | "halt")),
        "init" | "telinit" => args.first() == Some(&"0"),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_stopping_user_data_is_recognised() {
        let cases = [
            (
                "the seeds' script",
                "#!/bin/bash\n/etc/eks/bootstrap.sh c\nuntil curl -sf http://localhost:10248/healthz; do sleep 5; done\nsleep 30\npoweroff\n",
                true,
            ),
            (
                "after a command",
                "/etc/eks/bootstrap.sh c && sudo /sbin/shutdown -h now",
                true,
            ),
            ("systemctl", "(sleep 60; systemctl poweroff) &", true),
            ("init 0", "init 0", true),
            ("a reboot is no stop", "shutdown -r now", false),
            (
                "a comment",
                "# poweroff when done\n/etc/eks/bootstrap.sh c",
                false,
            ),
            ("a word inside another", "echo poweroff-guard\n", false),
            (
                "AL2023 nodeadm in MIME multipart",
                "MIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"B\"\n\n--B\nContent-Type: application/node.eks.aws\n\napiVersion: node.eks.aws/v1alpha1\nkind: NodeConfig\n--B--\n",
                false,
            ),
            (
                "Bottlerocket TOML",
                "[settings.kubernetes]\ncluster-name = \"c\"\n",
                false,
            ),
            (
                "a MIME shell part that powers off",
                "--B\nContent-Type: text/x-shellscript\n\n#!/bin/bash\nsleep 30; poweroff\n--B--",
                true,
            ),
        ];
        for (what, user_data, want) in cases {
            assert_eq!(powers_off(user_data), want, "{what}");
        }
    }
}
