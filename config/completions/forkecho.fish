# Print an optspec for argparse to handle cmd's options that are independent of any subcommand.
function __fish_forkecho_global_optspecs
    string join \n c/config= l/listen= banner= backlog= idle-timeout= shutdown-timeout= kill-timeout= max-session-time= max-children= max-per-source= source-prefix-v4= source-prefix-v6= allow= deny= max-rate-per-source= rate-burst= refusal-message= reuse-port= unix-socket-mode= unix-socket-owner= unix-socket-group= pid-file= control-socket= metrics-listen= log-file= daemonize= user= group= log-level= log-format= session-stderr= env= clear-env= session-limits= nice= working-directory= proxy-protocol= trusted-proxies= proxy-header-timeout= check-config h/help V/version
end

function __fish_forkecho_needs_command
    # Figure out if the current invocation already has a command.
    set -l cmd (commandline -opc)
    set -e cmd[1]
    argparse -s (__fish_forkecho_global_optspecs) -- $cmd 2>/dev/null
    or return
    if set -q argv[1]
        # Also print the command, so this can be used to figure out what it is.
        echo $argv[1]
        return 1
    end
    return 0
end

function __fish_forkecho_using_subcommand
    set -l cmd (__fish_forkecho_needs_command)
    test -z "$cmd"
    and return 1
    contains -- $cmd[1] $argv
end

complete -c forkecho -n "__fish_forkecho_needs_command" -s c -l config -d 'TOML config file (keys as the long options, in snake_case); a regular file, read again on each reload (SIGHUP)' -r -F
complete -c forkecho -n "__fish_forkecho_needs_command" -s l -l listen -d 'Address to listen on, IP:PORT (`[::1]:PORT` for IPv6) or unix:/PATH (a UNIX-domain socket); repeatable; port 0 picks a free port [default: 127.0.0.1:2333]' -r
complete -c forkecho -n "__fish_forkecho_needs_command" -l banner -d 'Greeting sent to each client; \\n \\r \\t \\\\ are interpreted; "" sends nothing [default: "connect successful!\\n"]' -r
complete -c forkecho -n "__fish_forkecho_needs_command" -l backlog -d 'Listen backlog: connections the kernel queues before forkecho accepts them [default: 1024]' -r
complete -c forkecho -n "__fish_forkecho_needs_command" -l idle-timeout -d 'Close a session after this many seconds without input, or with a write blocked this long; 0 = never [default: 300]' -r
complete -c forkecho -n "__fish_forkecho_needs_command" -l shutdown-timeout -d 'On SIGTERM (smart shutdown), seconds sessions get to finish before a fast shutdown [default: 10]' -r
complete -c forkecho -n "__fish_forkecho_needs_command" -l kill-timeout -d 'On shutdown, seconds between the SIGTERM and the SIGKILL sent to sessions [default: 2]' -r
complete -c forkecho -n "__fish_forkecho_needs_command" -l max-session-time -d 'End a session after this many seconds whatever it is doing; 0 = no limit [default: 0]' -r
complete -c forkecho -n "__fish_forkecho_needs_command" -l max-children -d 'Most sessions at once; at the limit new clients wait in the backlog [default: 1024]' -r
complete -c forkecho -n "__fish_forkecho_needs_command" -l max-per-source -d 'Most sessions at once from one source; more are refused; 0 = no limit [default: 32]' -r
complete -c forkecho -n "__fish_forkecho_needs_command" -l source-prefix-v4 -d 'IPv4 addresses sharing this prefix length count as one source [default: 32]' -r
complete -c forkecho -n "__fish_forkecho_needs_command" -l source-prefix-v6 -d 'IPv6 addresses sharing this prefix length count as one source [default: 64]' -r
complete -c forkecho -n "__fish_forkecho_needs_command" -l allow -d 'Serve only clients in this prefix (ADDR/LEN or ADDR), or local processes of this uid (uid:N); repeatable; none of a kind = everyone of that kind' -r
complete -c forkecho -n "__fish_forkecho_needs_command" -l deny -d 'Refuse clients in this prefix (ADDR/LEN or ADDR), or local processes of this uid (uid:N); repeatable; wins over --allow' -r
complete -c forkecho -n "__fish_forkecho_needs_command" -l max-rate-per-source -d 'New connections per second allowed from one source; 0 = no limit [default: 0]' -r
complete -c forkecho -n "__fish_forkecho_needs_command" -l rate-burst -d 'Connections one source may open at once before the rate applies; needs --max-rate-per-source [default: the rate, at least 1]' -r
complete -c forkecho -n "__fish_forkecho_needs_command" -l refusal-message -d 'Line sent to a refused client before closing (\\n etc. interpreted) [default: ""]' -r
complete -c forkecho -n "__fish_forkecho_needs_command" -l reuse-port -d 'Set SO_REUSEPORT, so several forkecho instances can listen on one port' -r
complete -c forkecho -n "__fish_forkecho_needs_command" -l unix-socket-mode -d 'Permissions of a UNIX-domain socket\'s file (octal): who may connect [default: 0666]' -r
complete -c forkecho -n "__fish_forkecho_needs_command" -l unix-socket-owner -d 'Owner (user name or uid) of a UNIX-domain socket\'s file [default: `user` if set, else forkecho\'s]' -r
complete -c forkecho -n "__fish_forkecho_needs_command" -l unix-socket-group -d 'Group (name or gid) of a UNIX-domain socket\'s file [default: `group` (or `user`\'s) if set, else forkecho\'s]' -r
complete -c forkecho -n "__fish_forkecho_needs_command" -l pid-file -d 'Write the parent\'s pid here once listening, locked against a second instance' -r
complete -c forkecho -n "__fish_forkecho_needs_command" -l control-socket -d 'UNIX-domain socket for the control commands (status, reload, stop, reopen-logs) [default: the pid file\'s path ending in .ctl; none without a pid file]' -r
complete -c forkecho -n "__fish_forkecho_needs_command" -l metrics-listen -d 'Serve Prometheus metrics at http://IP:PORT/metrics [default: none]' -r
complete -c forkecho -n "__fish_forkecho_needs_command" -l log-file -d 'Append the log (everyone\'s stderr) to this file instead of stderr' -r
complete -c forkecho -n "__fish_forkecho_needs_command" -l daemonize -d 'Detach and run in the background; return once listening (exit 0) or with the error' -r
complete -c forkecho -n "__fish_forkecho_needs_command" -l user -d 'After binding, drop privileges to this user (name or uid); needs root' -r
complete -c forkecho -n "__fish_forkecho_needs_command" -l group -d 'With --user: the group (name or gid) [default: the user\'s primary group]' -r
complete -c forkecho -n "__fish_forkecho_needs_command" -l log-level -d 'error, warn, info, debug, trace or off; RUST_LOG, when set, wins [default: info]' -r
complete -c forkecho -n "__fish_forkecho_needs_command" -l log-format -d 'Layout of log lines: text, json or logfmt (the same fields in each) [default: text]' -r
complete -c forkecho -n "__fish_forkecho_needs_command" -l session-stderr -d 'Where a program\'s stderr goes: log (forkecho\'s log, bytes unchanged) or null [default: log]' -r
complete -c forkecho -n "__fish_forkecho_needs_command" -l env -d 'Add this variable to a program\'s environment; repeatable' -r
complete -c forkecho -n "__fish_forkecho_needs_command" -l clear-env -d 'Start a program\'s environment empty instead of from forkecho\'s (the connection\'s variables and --env are still set)' -r
complete -c forkecho -n "__fish_forkecho_needs_command" -l session-limits -d 'A resource limit a program starts with, NAME=VALUE (cpu seconds, address_space, open_files, processes, core, file_size; bytes or a count; or unlimited); repeatable' -r
complete -c forkecho -n "__fish_forkecho_needs_command" -l nice -d 'A program\'s nice value, -20 (first) to 19 (last); below forkecho\'s own needs CAP_SYS_NICE [default: forkecho\'s]' -r
complete -c forkecho -n "__fish_forkecho_needs_command" -l working-directory -d 'Directory a program starts in [default: forkecho\'s]' -r
complete -c forkecho -n "__fish_forkecho_needs_command" -l proxy-protocol -d 'Expect a PROXY protocol header (HAProxy\'s; v1, v2 or any) before the client\'s data on every --listen address, naming the real client; off = none [default: off]' -r
complete -c forkecho -n "__fish_forkecho_needs_command" -l trusted-proxies -l trusted-proxy -d 'A load balancer (ADDR/LEN or ADDR) allowed to send PROXY headers; repeatable; others are refused on a PROXY listener' -r
complete -c forkecho -n "__fish_forkecho_needs_command" -l proxy-header-timeout -d 'Seconds a PROXY listener waits for the whole header before refusing the connection [default: 5]' -r
complete -c forkecho -n "__fish_forkecho_needs_command" -l check-config -d 'Validate the configuration, print `configuration OK` and exit 0 (exit 2 on an error)'
complete -c forkecho -n "__fish_forkecho_needs_command" -s h -l help -d 'Print help'
complete -c forkecho -n "__fish_forkecho_needs_command" -s V -l version -d 'Print version'
complete -c forkecho -n "__fish_forkecho_needs_command" -a "status" -d 'Show what the running server is doing; exit 3 if none runs'
complete -c forkecho -n "__fish_forkecho_needs_command" -a "reload" -d 'Re-read the configuration; exit 1 with the reason if the server refused it'
complete -c forkecho -n "__fish_forkecho_needs_command" -a "stop" -d 'Shut the running server down and wait until it is gone'
complete -c forkecho -n "__fish_forkecho_needs_command" -a "reopen-logs" -d 'Reopen log_file (after logrotate renamed it)'
complete -c forkecho -n "__fish_forkecho_needs_command" -a "upgrade" -d 'Replace the running binary by the one now on disk, in place, keeping every session; exit 1 with the reason if the new one was refused (the old one keeps serving)'
complete -c forkecho -n "__fish_forkecho_needs_command" -a "help" -d 'Print this message or the help of the given subcommand(s)'
complete -c forkecho -n "__fish_forkecho_using_subcommand status" -s h -l help -d 'Print help'
complete -c forkecho -n "__fish_forkecho_using_subcommand reload" -s h -l help -d 'Print help'
complete -c forkecho -n "__fish_forkecho_using_subcommand stop" -s m -l mode -d 'smart: sessions may finish (up to shutdown_timeout); fast: SIGTERM them; immediate: SIGKILL them' -r
complete -c forkecho -n "__fish_forkecho_using_subcommand stop" -s h -l help -d 'Print help'
complete -c forkecho -n "__fish_forkecho_using_subcommand reopen-logs" -s h -l help -d 'Print help'
complete -c forkecho -n "__fish_forkecho_using_subcommand upgrade" -s h -l help -d 'Print help'
complete -c forkecho -n "__fish_forkecho_using_subcommand help; and not __fish_seen_subcommand_from status reload stop reopen-logs upgrade help" -f -a "status" -d 'Show what the running server is doing; exit 3 if none runs'
complete -c forkecho -n "__fish_forkecho_using_subcommand help; and not __fish_seen_subcommand_from status reload stop reopen-logs upgrade help" -f -a "reload" -d 'Re-read the configuration; exit 1 with the reason if the server refused it'
complete -c forkecho -n "__fish_forkecho_using_subcommand help; and not __fish_seen_subcommand_from status reload stop reopen-logs upgrade help" -f -a "stop" -d 'Shut the running server down and wait until it is gone'
complete -c forkecho -n "__fish_forkecho_using_subcommand help; and not __fish_seen_subcommand_from status reload stop reopen-logs upgrade help" -f -a "reopen-logs" -d 'Reopen log_file (after logrotate renamed it)'
complete -c forkecho -n "__fish_forkecho_using_subcommand help; and not __fish_seen_subcommand_from status reload stop reopen-logs upgrade help" -f -a "upgrade" -d 'Replace the running binary by the one now on disk, in place, keeping every session; exit 1 with the reason if the new one was refused (the old one keeps serving)'
complete -c forkecho -n "__fish_forkecho_using_subcommand help; and not __fish_seen_subcommand_from status reload stop reopen-logs upgrade help" -f -a "help" -d 'Print this message or the help of the given subcommand(s)'
