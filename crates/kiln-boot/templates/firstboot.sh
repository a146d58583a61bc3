#!/bin/sh
# kiln's first boot, in the new OS (every installer file kiln renders puts
# this script at /var/lib/kiln/firstboot.sh and runs it once the network is
# up: cloud-init's runcmd, or the kiln-firstboot systemd unit). It is fixed
# text: the job's values come from /etc/kiln-firstboot.env, read with sed
# and never sourced or evaluated, so no value can run as code here.
#
# 1. the job's post-install script, if the installer left one at
#    /var/lib/kiln/post-install.sh (once: its result is kept for a retry);
# 2. install stage 5 to kiln with the job's token, the script's exit status
#    and the end of its output in the message; then the token is deleted;
# 3. the job's callback URL, if any: a POST from this server, as the
#    tenant asked (kiln's own servers never call it).
# Lines it prints start with "kiln-firstboot:". Exits 1 while stage 5 could
# not be reported, so that systemd's Restart= tries again.

# KILN_FIRSTBOOT_ROOT: where / is (kiln's own tests run it in a directory).
env=${KILN_FIRSTBOOT_ROOT:-}/etc/kiln-firstboot.env
state=${KILN_FIRSTBOOT_ROOT:-}/var/lib/kiln
say() { echo "kiln-firstboot: $*"; }
[ -f "$env" ] || { say "no $env: nothing to do"; exit 0; }
get() { sed -n "s/^$1=//p" "$env" | head -n 1; }
stage_url=$(get KILN_STAGE_URL)
token=$(get KILN_TOKEN)
callback=$(get KILN_CALLBACK_URL)
job=$(get KILN_JOB_ID)

# post URL CONTENT_TYPE BODY [TOKEN]: curl where there is one (every
# distribution image; -g: a URL's [] and {} are not curl's globs), else
# busybox wget.
post() {
    if command -v curl >/dev/null 2>&1; then
        if [ -n "$4" ]; then
            curl -fsSg -o /dev/null --max-time 20 -H "Authorization: Bearer $4" -H "Content-Type: $2" --data-binary "$3" "$1"
        else
            curl -fsSg -o /dev/null --max-time 20 -H "Content-Type: $2" --data-binary "$3" "$1"
        fi
    elif [ -n "$4" ]; then
        # timeout: busybox 1.35's own wget -T crashes.
        timeout 20 wget -q -O /dev/null --header "Authorization: Bearer $4" --header "Content-Type: $2" --post-data "$3" "$1"
    else
        timeout 20 wget -q -O /dev/null --header "Content-Type: $2" --post-data "$3" "$1"
    fi
}

# 1. The post-install script.
if [ -f "$state/post-install.sh" ] && [ ! -f "$state/post-install.result" ]; then
    say "running the post-install script"
    chmod 700 "$state/post-install.sh"
    "$state/post-install.sh" >"$state/post-install.log" 2>&1
    rc=$?
    {
        echo "$rc"
        tail -c 1500 "$state/post-install.log" | tr -d '\000'
    } >"$state/post-install.result"
    say "post-install script exit $rc"
fi
if [ -f "$state/post-install.result" ]; then
    rc=$(head -n 1 "$state/post-install.result")
    result="post-install script exit $rc: $(tail -n +2 "$state/post-install.result")"
else
    rc=
    result="no post-install script"
fi

# 2. Stage 5.
reported=
for try in 1 2 3 4 5 6 7 8 9 10; do
    if post "$stage_url/5" text/plain "first boot; $result" "$token"; then
        reported=1
        break
    fi
    sleep 3
done
if [ -z "$reported" ]; then
    say "stage 5 report to $stage_url/5 failed after 10 tries"
    exit 1
fi
say "stage 5 reported to $stage_url/5"

# 3. The callback, once stage 5 is in. The job id and hostname are plain
# (a UUID, a checked hostname); the exit status a number or null.
if [ -n "$callback" ]; then
    body="{\"job_id\":\"$job\",\"hostname\":\"$(hostname)\",\"stage\":5,\"post_install_exit\":${rc:-null}}"
    called=
    for try in 1 2 3 4 5; do
        if post "$callback" application/json "$body"; then
            called=1
            break
        fi
        sleep 3
    done
    if [ -n "$called" ]; then say "callback called: $callback"; else say "callback $callback failed after 5 tries"; fi
fi
rm -f "$env"
sync
exit 0
